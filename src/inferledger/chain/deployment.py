"""The Deployment record: which contracts live where on which chain.

Saved as JSON so every later command (node, SDK, CLI) finds the same contracts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field


class ContractAddresses(BaseModel):
    token: str
    model_registry: str
    node_registry: str
    host_earnings: str
    marketplace: str


class DeployParams(BaseModel):
    """Deployment settings; token amounts are in base units of the payment token."""

    token: str | None = Field(
        default=None, description="Existing payment token; None deploys TestUSDC (dev chains)"
    )
    treasury: str | None = Field(default=None, description="Fee receiver; default the deployer")
    fee_bps: int = Field(default=1000, ge=0, le=2000)
    min_deposit: int = Field(default=10_000, gt=0, description="0.01 USDC")
    max_deposit: int = Field(default=10_000 * 10**6, gt=0, description="10,000 USDC")
    close_window: int = Field(default=3600, gt=0, description="seconds")
    min_stake: int = Field(default=10 * 10**6, ge=0, description="10 USDC")
    unbonding_delay: int = Field(default=7 * 86400, ge=0, description="seconds")


class Deployment(BaseModel):
    chain_id: int
    deploy_block: int
    deployer: str
    treasury: str
    addresses: ContractAddresses
    params: DeployParams

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Deployment:
        return cls.model_validate_json(path.read_text())
