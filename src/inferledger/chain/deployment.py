"""The Deployment record: which contracts live where on which chain.

Saved as JSON so every later command (node, SDK, CLI) finds the same contracts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, model_validator


class ContractAddresses(BaseModel):
    token: str
    model_registry: str
    node_registry: str
    host_earnings: str
    marketplace: str
    verifier_registry: str
    disputes: str


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
    exposure_bps: int = Field(
        default=5000,
        gt=0,
        description="open deposits plus paid amounts in their dispute window, per 10,000 of "
        "a host's stake",
    )
    dispute_window: int = Field(
        default=86400, gt=0, description="seconds after a settlement a dispute may open"
    )
    dispute_bond: int = Field(default=5 * 10**6, ge=0, description="5 USDC per dispute")
    jury_size: int = Field(default=3, ge=1, le=9, description="jurors per dispute; odd")
    verdict_period: int = Field(default=3600, gt=0, description="seconds for jurors to vote")
    verifier_fee: int = Field(default=500_000, ge=0, description="0.5 USDC per majority juror")
    penalty_bps: int = Field(
        default=20_000, ge=10_000, description="slash per 10,000 of what the session paid"
    )
    silent_penalty: int = Field(default=10**6, ge=0, description="1 USDC from a silent juror")
    minority_penalty: int = Field(default=10**6, ge=0, description="1 USDC from a minority juror")
    verifier_min_stake: int = Field(default=10 * 10**6, gt=0, description="10 USDC")

    @model_validator(mode="after")
    def _slash_covers_exposure(self) -> DeployParams:
        if self.jury_size % 2 == 0:
            raise ValueError(f"jury_size must be odd (a majority must exist), not {self.jury_size}")
        if self.exposure_bps * self.penalty_bps > 10_000 * 10_000:
            raise ValueError(
                f"exposure_bps x penalty_bps ({self.exposure_bps} x {self.penalty_bps}) must be "
                "at most 10,000 x 10,000, or a slash could not cover a host's exposure"
            )
        return self


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
