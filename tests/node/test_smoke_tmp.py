import asyncio
from eth_utils import keccak
from node_support import NodeFactory, serve_model, expect
from inferledger.chain.devchain import DevWorld
from inferledger.inference import Backend
from inferledger.sdk.wire import SessionClient
from support import open_session

HELLO = [{"role": "user", "content": "hello"}]

def test_smoke(world: DevWorld, scripted: Backend, start_node: NodeFactory) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, proof_interval=10)
    node, server = start_node(scripted)

    async def run():
        client = await SessionClient.connect(server.ws_url, session_id, signer.key, expect=expect(world))
        reply = await client.chat(HELLO, max_tokens=35)
        ended = await client.end()
        frame = await client.wait_settlement(20)
        return reply, ended, frame

    reply, ended, frame = asyncio.run(run())
    print(reply, ended, frame)
    print([ (r.input_tokens, r.tokens) for r in node.state.receipts(session_id)])
    assert len(reply.token_ids) == 35
