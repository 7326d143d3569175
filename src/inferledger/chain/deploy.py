"""Deploy the inferledger contracts and wire them together."""

from __future__ import annotations

from typing import Any

from inferledger.chain.compile import CompiledContract, compile_all
from inferledger.chain.connect import Chain
from inferledger.chain.contracts import Contracts
from inferledger.chain.deployment import ContractAddresses, Deployment, DeployParams
from inferledger.chain.errors import ChainError
from inferledger.chain.tx import TxSender


def deploy_compiled(chain: Chain, sender: TxSender, compiled: CompiledContract, *args: Any) -> str:
    """Deploy one compiled contract with constructor ``args``; its address."""
    factory = chain.w3.eth.contract(abi=compiled.abi, bytecode=compiled.bytecode)
    receipt = sender.transact(factory.constructor(*args), f"deploy {compiled.name}")
    address = receipt["contractAddress"]
    if address is None:  # a successful deployment's receipt always names its contract
        raise ChainError(f"deploy {compiled.name}: the receipt names no contract address")
    return address


def deploy(chain: Chain, sender: TxSender, params: DeployParams | None = None) -> Contracts:
    """Deploy all contracts from ``sender`` (the owner) and return them wrapped.

    Without ``params.token`` a TestUSDC is deployed, which only makes sense on a dev chain.
    """
    params = params or DeployParams()
    if params.token is None and not chain.is_dev:
        raise ChainError(
            "no payment token given and this is not a dev chain: pass the USDC address "
            "(`inferledger deploy --token ADDRESS`) instead of deploying TestUSDC"
        )
    compiled = compile_all()
    start_block = chain.block_number()
    treasury = params.treasury or sender.address
    token = params.token or deploy_compiled(chain, sender, compiled["TestUSDC"])
    models = deploy_compiled(chain, sender, compiled["ModelRegistry"])
    nodes = deploy_compiled(
        chain,
        sender,
        compiled["NodeRegistry"],
        token,
        models,
        params.min_stake,
        params.unbonding_delay,
        params.exposure_bps,
    )
    earnings = deploy_compiled(chain, sender, compiled["HostEarnings"])
    marketplace = deploy_compiled(
        chain,
        sender,
        compiled["JobMarketplace"],
        token,
        nodes,
        models,
        earnings,
        treasury,
        params.fee_bps,
        params.min_deposit,
        params.max_deposit,
        params.close_window,
    )
    verifiers = deploy_compiled(
        chain,
        sender,
        compiled["VerifierRegistry"],
        token,
        params.verifier_min_stake,
        params.unbonding_delay,
    )
    disputes = deploy_compiled(
        chain,
        sender,
        compiled["DisputeManager"],
        token,
        marketplace,
        nodes,
        verifiers,
        params.dispute_window,
        params.dispute_bond,
        params.jury_size,
        params.verdict_period,
        params.verifier_fee,
        params.penalty_bps,
        params.silent_penalty,
        params.minority_penalty,
    )
    deployment = Deployment(
        chain_id=chain.chain_id,
        deploy_block=start_block + 1,
        deployer=sender.address,
        treasury=treasury,
        addresses=ContractAddresses(
            token=token,
            model_registry=models,
            node_registry=nodes,
            host_earnings=earnings,
            marketplace=marketplace,
            verifier_registry=verifiers,
            disputes=disputes,
        ),
        params=params,
    )
    contracts = Contracts.attach(chain, deployment)
    sender.transact(contracts.nodes.contract.functions.set_marketplace(marketplace))
    sender.transact(contracts.earnings.contract.functions.set_marketplace(marketplace))
    sender.transact(contracts.nodes.contract.functions.set_disputes(disputes))
    sender.transact(contracts.verifiers.contract.functions.set_disputes(disputes))
    return contracts
