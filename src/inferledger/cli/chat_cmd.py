"""`inferledger chat`: a paid, streamed conversation with a host, settled at the end."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from inferledger.cli.common import (
    USER_KEY_ENV,
    CliError,
    DeploymentOption,
    RpcOption,
    default_model_name,
    env_key,
    err,
    make_client,
    model_label,
    one_line_errors,
    parse_usdc,
    price_text,
    settings_for,
)
from inferledger.cli.session_cmd import print_settlement

if TYPE_CHECKING:
    from rich.console import Console

    from inferledger.config import Settings
    from inferledger.sdk import Client, Session

QUIT = ("/quit", "/exit")


def chat(
    message: Annotated[
        list[str] | None,
        typer.Option(
            "--message",
            "-m",
            help="Send this and exit (repeatable: one turn each). Without it, a piped stdin "
            "is sent as one message; on a terminal the chat is interactive.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Model name (or 0x id). Default: the only model --host serves; else the "
            "model_name setting, else the packaged SmolLM2.",
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option("--host", help="Host address. Default: the cheapest active host for --model."),
    ] = None,
    deposit: Annotated[
        str, typer.Option("--deposit", help="USDC to escrow; what is not spent is refunded.")
    ] = "2",
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", min=1, help="Longest reply, in tokens. Default: the node's."),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 is greedy."),
    ] = None,
    session_id: Annotated[
        int | None,
        typer.Option(
            "--session",
            min=1,
            help="Continue this stored session (from $INFERLEDGER_HOME/sessions) instead of "
            "opening a new one.",
        ),
    ] = None,
    keep_open: Annotated[
        bool,
        typer.Option(
            "--keep-open",
            help="Leave the session open at the end (continue it with --session ID; close it "
            "with `inferledger session close ID`).",
        ),
    ] = False,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
) -> None:
    """Chat with a host, paying per token from a USDC deposit (signed with INFERLEDGER_KEY).

    Opens a session (approve + deposit), streams each reply as it is generated and
    shows the cost so far. `/quit` or Ctrl-D ends; the session is then closed and the
    settlement printed (tokens, host, fee, refund, transaction). Ctrl-C closes it too.
    """
    params: dict[str, object] = {}
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    if temperature is not None:
        params["temperature"] = temperature
    interrupted = False
    with one_line_errors():
        inputs = _inputs(message)
        amount = parse_usdc(deposit, "--deposit")
        settings = settings_for(rpc, deployment)
        client = make_client(rpc, deployment, key=env_key(USER_KEY_ENV, "user"))
        console = err()
        session = _session(client, console, session_id, host, model, amount, settings)
        if keep_open:
            session.detach()  # not closed at exit: another run continues it
        try:
            _converse(session, console, inputs, params)
        except KeyboardInterrupt:
            interrupted = True
            console.print()
        finally:
            _finish(session, console, keep_open)
    if interrupted:
        raise typer.Exit(130)


def _inputs(messages: list[str] | None) -> list[str] | None:
    """The messages to send, or None for an interactive chat."""
    if messages:
        return list(messages)
    if _stdin_is_terminal():
        return None
    text = sys.stdin.read().strip()
    if not text:
        raise CliError(
            "nothing to send: stdin is empty; pass --message TEXT, pipe a question in, or run "
            "`inferledger chat` in a terminal"
        )
    return [text]


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def _session(
    client: Client,
    console: Console,
    session_id: int | None,
    host: str | None,
    model: str | None,
    deposit: int,
    settings: Settings,
) -> Session:
    from inferledger.chain.units import format_usdc

    if session_id is not None:
        session = client.sessions.resume(session_id)
        if session.closed:
            status = session.settlement.status if session.settlement else "closed"
            raise CliError(f"session {session_id} is {status}: start a new chat without --session")
        console.print(
            f"session {session.id} resumed: {session.input_tokens} input + {session.tokens} "
            f"output tokens so far, cost {format_usdc(session.cost)} of "
            f"{format_usdc(session.deposit)} USDC",
            markup=False,
        )
        return session
    if deposit <= 0:
        raise CliError("--deposit must be above zero, e.g. 2 (USDC)")
    address, model_id = _pick_host(client, host, model, settings)
    with console.status("opening the session (approve and deposit)..."):
        session = client.sessions.open(address, model_id, deposit)
    console.print(
        f"session {session.id} open with host {session.host}: "
        f"{model_label(client.contracts, session.model_id)} at "
        f"{price_text(session.input_price_per_mtok)} per prompt token and "
        f"{price_text(session.output_price_per_mtok)} USDC per reply token, deposit "
        f"{format_usdc(deposit)} USDC",
        markup=False,
    )
    return session


def _pick_host(
    client: Client, host: str | None, model: str | None, settings: Settings
) -> tuple[str, bytes]:
    from eth_utils.address import is_address, to_checksum_address

    from inferledger.sdk.hosts import model_id_of

    nodes = client.contracts.nodes
    if host is not None:
        if not is_address(host):
            raise CliError(f"--host {host!r} is not an address: give 0x and 40 hex digits")
        address = to_checksum_address(host)
        if model is None:
            served = [
                m for m in nodes.host_models(address) if nodes.prices_of(address, m).output_per_mtok
            ]
            if len(served) != 1:
                raise CliError(
                    f"host {address} serves {len(served)} models: say which with --model"
                )
            return address, served[0]
        return address, model_id_of(model)
    name = model or default_model_name(settings)
    offers = client.hosts.list(model=name)
    if not offers:
        raise CliError(
            f"no active host serves model {name!r} (id 0x{model_id_of(name).hex()}): check "
            "--model, or register a host for it (`inferledger host register --model ...`)"
        )
    return offers[0].address, offers[0].model_id


def _converse(
    session: Session, console: Console, inputs: list[str] | None, params: dict[str, object]
) -> None:
    from inferledger.sdk import SdkError, SessionClosed

    history = _history(session)
    interactive = inputs is None
    if interactive:
        console.print("type a message; /quit or Ctrl-D ends and settles the session")
    queue = iter(inputs or ())
    while True:
        text: str | None
        if interactive:
            try:
                text = console.input("[bold]you>[/] ").strip()
            except EOFError:
                console.print()
                return
            if not text:
                continue
            if text in QUIT:
                return
        else:
            text = next(queue, None)
            if text is None:
                return
        turn = [*history, {"role": "user", "content": text}]
        try:
            reply = _stream(session, turn, params, interactive)
        except SessionClosed as exc:
            if not interactive:
                raise
            console.print(f"error: {exc}", style="red", markup=False)
            return  # no prompt will be taken: settle
        except SdkError as exc:
            if not interactive:
                raise
            console.print(f"error: {exc}", style="red", markup=False)
            continue
        history = [*turn, {"role": "assistant", "content": reply}]
        _show_cost(session, console)
        if session.last_reply is not None and session.last_reply.finish_reason == "closing":
            return  # the node is settling the session: nothing more will be served


def _stream(
    session: Session, messages: list[dict[str, str]], params: dict[str, object], interactive: bool
) -> str:
    if interactive:
        sys.stdout.write("\x1b[1massistant>\x1b[0m " if sys.stdout.isatty() else "assistant> ")
    parts = []
    try:
        for text in session.stream_sync(messages, **params):
            parts.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return "".join(parts)


def _show_cost(session: Session, console: Console) -> None:
    from inferledger.chain.units import format_usdc

    reply = session.last_reply
    if reply is None:
        return
    note = ""
    if reply.finish_reason == "budget":
        note = (
            "; the deposit or the session's time is used up: end here and chat again with a "
            "larger --deposit"
        )
    elif reply.finish_reason == "length":
        note = "; cut at --max-tokens"
    elif reply.finish_reason == "closing":
        note = (
            "; the node stopped: the session is being settled (a close request, or its "
            "expiry is near)"
        )
    console.print(
        f"[{len(reply.token_ids)} tokens for a {reply.prompt_tokens}-token prompt; session "
        f"{reply.input_tokens} input + {reply.session_tokens} output tokens, cost so far "
        f"{format_usdc(reply.cost)} of {format_usdc(session.deposit)} USDC{note}]",
        style="dim",
        markup=False,
    )


def _history(session: Session) -> list[dict[str, str]]:
    """A resumed session's conversation so far: the last prompt and its reply."""
    replies = [r for r in session.record.replies if r.token_ids]
    if not replies:
        return []
    last = replies[-1]
    return [*last.messages, {"role": "assistant", "content": last.text}]


def _finish(session: Session, console: Console, keep_open: bool) -> None:
    if keep_open and not session.closed:
        session.detach()
        console.print(
            f"session {session.id} left open: continue with `inferledger chat --session "
            f"{session.id}`, end it with `inferledger session close {session.id}`",
            markup=False,
        )
        return
    with console.status("closing the session: the node settles on chain..."):
        settlement = session.close()
    print_settlement(console, settlement)
