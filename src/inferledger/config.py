"""All settings in one place: environment variables (``INFERLEDGER_*``) and a TOML file.

The TOML file is ``inferledger.toml`` in the working directory, or the path in
``INFERLEDGER_CONFIG``. Environment variables win over the file. Settings are
validated when loaded, and an invalid one is reported by name.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERLEDGER_", extra="forbid")

    chain_url: str = Field(
        default="embedded",
        description="'embedded' (in-process py-evm) or a JSON-RPC URL such as http://127.0.0.1:8545",
    )
    gas_cap: int = Field(
        default=8_000_000, gt=21_000, description="Most gas one transaction may use"
    )
    receipt_timeout: float = Field(
        default=120.0, gt=0, description="Seconds to wait for a transaction receipt"
    )
    deployment_file: Path = Field(
        default=Path("deployment.json"), description="Where `deploy` writes the contract addresses"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get("INFERLEDGER_CONFIG", "inferledger.toml"))
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file))


def load_settings(**overrides: object) -> Settings:
    """Settings from overrides, the environment and the TOML file, or a ConfigError."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"setting {'.'.join(str(p) for p in err['loc'])} "
            f"(INFERLEDGER_{str(err['loc'][0]).upper()}): {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(problems) from exc
