"""`cai-ray serve`'s config."""

from __future__ import annotations

from dataclasses import dataclass, field

from cai_ray.config import ConfigError, positive, setting
from cai_ray.config.sections import EngineConfig, LabelerConfig


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = setting(1_000_000, "larger request bodies get 413")
    max_messages: int = setting(64, "messages per chat request")
    max_message_chars: int = setting(32_000, "characters per message / response")
    max_tokens: int = setting(512, "largest max_tokens a request may ask for (larger: 400)")
    default_max_tokens: int = setting(128, "max_tokens when a request sets none")

    def validate(self, where: str) -> None:
        for k in ("max_body_bytes", "max_messages", "max_message_chars", "max_tokens", "default_max_tokens"):
            positive(where, k, getattr(self, k))
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(f"{where}.default_max_tokens: must be <= max_tokens")


@dataclass(frozen=True)
class ServeScaling:
    min_replicas: int = setting(1, "autoscaling: fewest replicas")
    max_replicas: int = setting(1, "autoscaling: most replicas")
    target_ongoing_requests: float = setting(4.0, "autoscaling: ongoing requests per replica to aim for")
    max_ongoing_requests: int = setting(16, "requests a replica works on at once")
    max_queued_requests: int = setting(32, "requests waiting per caller before 503 (bounded: overload fails fast)")
    request_timeout_s: float = setting(120.0, "HTTP request timeout (the proxy answers 408 after it)")
    max_batch_size: int = setting(8, "chat requests batched into one engine call (@serve.batch)")
    batch_wait_timeout_s: float = setting(0.02, "how long a batch waits to fill")
    cpus_per_replica: float = setting(1.0, "CPUs reserved per replica")
    gpus_per_replica: float = setting(0.0, "GPUs per replica")

    def validate(self, where: str) -> None:
        for k in (
            "min_replicas",
            "max_replicas",
            "target_ongoing_requests",
            "max_ongoing_requests",
            "max_queued_requests",
            "request_timeout_s",
            "max_batch_size",
            "cpus_per_replica",
        ):
            positive(where, k, getattr(self, k))
        if self.min_replicas > self.max_replicas:
            raise ConfigError(f"{where}.min_replicas: must be <= max_replicas")
        if self.batch_wait_timeout_s < 0 or self.gpus_per_replica < 0:
            raise ConfigError(f"{where}: batch_wait_timeout_s and gpus_per_replica must be >= 0")


REWARD_SCORERS = ("auto", "model", "labeler")


@dataclass(frozen=True)
class ServeReward:
    """The reward routes (/v1/reward, /v1/reward/openrlhf, /classify): what scores a response."""

    model: str = setting(
        "", "preference model for the reward routes (`cai-ray train rm` OUTPUT/model, or an alias); '' = none"
    )
    scorer: str = setting(
        "auto",
        "what scores a reward request that does not choose: model (the preference model's r(prompt + response)) | "
        "labeler (d-RLAIF: the labeler's probability that the response beats a reference answer) | auto (model "
        "when reward.model is set, else labeler)",
    )
    max_items: int = setting(256, "items per reward request (more: 400)")
    batch_size: int = setting(16, "items per preference-model forward pass or labeler call")
    reference_max_tokens: int = setting(
        128,
        "labeler scorer, item without a reference: token budget of the policy's greedy reference answer "
        "(at most limits.max_tokens)",
    )

    def validate(self, where: str) -> None:
        for k in ("max_items", "batch_size", "reference_max_tokens"):
            positive(where, k, getattr(self, k))
        if self.scorer not in REWARD_SCORERS:
            raise ConfigError(f"{where}.scorer: one of {', '.join(REWARD_SCORERS)}, got {self.scorer!r}")
        if self.scorer == "model" and not self.model:
            raise ConfigError(f"{where}.scorer: model needs {where}.model (a preference model folder)")

    @property
    def default_scorer(self) -> str:
        """The scorer of a request that names none: ``auto`` resolved."""
        if self.scorer == "auto":
            return "model" if self.model else "labeler"
        return self.scorer


GUARDS = ("none", "classifier")


@dataclass(frozen=True)
class ServeClassifier:
    """The constitutional classifiers of ``guard: classifier`` (docs/serving.md "Classifier guard")."""

    path: str = setting(
        "", "a `cai-ray classifiers` OUTPUT folder: its guard.json names the two models and their thresholds"
    )
    every_tokens: int = setting(
        16,
        "the output classifier checks the answer every N tokens (and the whole answer); a stream is held "
        "back until the text in it has passed its check",
    )
    input_threshold: float | None = setting(None, "refuse a prompt scored >= this; null = guard.json's threshold")
    output_threshold: float | None = setting(None, "cut an answer scored >= this; null = guard.json's threshold")
    log: str = setting(
        "",
        "the guard's decisions, one JSON line each (JSONL, appended); '' = cai_guard.jsonl in the Ray Serve log "
        "folder of each replica's node (beside the replica logs)",
    )
    device: str = setting("", "where the classifiers run: '' = the replica's GPU if it has one, else cpu")
    max_length: int = setting(512, "tokens a classifier reads (longer texts keep their end: the newest answer text)")

    def validate(self, where: str) -> None:
        positive(where, "every_tokens", self.every_tokens)
        positive(where, "max_length", self.max_length)
        for k in ("input_threshold", "output_threshold"):
            t = getattr(self, k)
            if t is not None and not 0 <= t <= 1:
                raise ConfigError(f"{where}.{k}: a probability in [0, 1] (or null for guard.json's), got {t!r}")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeConfig:
    """`cai-ray serve`: the policy (OpenAI-compatible chat), the AI labeler and the
    constitutional guardrail on Ray Serve."""

    # `label` named the method beside `labeler`, its model; renamed for one release
    DEPRECATED = {"label": ("method",)}

    policy: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "the served policy"})
    labeler: EngineConfig = field(
        default_factory=lambda: EngineConfig(model=""),
        metadata={"help": "labeler for /v1/label; model '' = the policy's engine"},
    )
    constitution: str = setting(
        "constitutions/general.yaml", "principles for /v1/label, /v1/critique and the guardrail"
    )
    guardrail: bool | str = setting(
        False,
        "critique every chat answer against the constitution and revise it when needed: true (a request "
        "may turn it off with cai_guardrail: false) | enforce (always on; cai_guardrail: false is a 400)",
    )
    guardrail_principles: int = setting(1, "principles sampled per guarded answer")
    guard: str = setting(
        "none",
        "none | classifier: constitutional classifiers check every prompt before generation and the answer "
        "every classifier.every_tokens tokens as it is made; a flagged one is answered with the constitution's "
        "refusal (the classifiers: classifier.path)",
    )
    classifier: ServeClassifier = field(
        default_factory=ServeClassifier, metadata={"help": "the classifiers of guard: classifier"}
    )
    method: LabelerConfig = field(
        default_factory=LabelerConfig, metadata={"help": "the labeling method of /v1/label (as in `cai-ray label`)"}
    )
    host: str = setting("127.0.0.1", "bind address (0.0.0.0 exposes the server: keep the API key on)")
    port: int = setting(8000, "HTTP port")
    api_key_file: str | None = setting(None, "file holding the bearer token; default: $CAI_RAY_API_KEY")
    auth: bool = setting(True, "require the bearer token on every route but /healthz (false only on a loopback host)")
    insecure_public: bool = setting(
        False, "allow auth: false on a non-loopback host (anyone who reaches it may use it)"
    )
    seed: int = setting(0, "seeds principle sampling")
    ray_address: str | None = setting(None, "join this Ray cluster; default: start a local one")
    limits: ServeLimits = field(default_factory=ServeLimits, metadata={"help": "input limits"})
    reward: ServeReward = field(
        default_factory=ServeReward,
        metadata={"help": "the reward routes for other trainers (OpenRLHF, verl, TRL): docs/serving.md"},
    )
    scaling: ServeScaling = field(default_factory=ServeScaling, metadata={"help": "replicas, batching, backpressure"})

    def validate(self) -> None:
        self.policy.validate("policy")
        if self.labeler.model:
            self.labeler.validate("labeler")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: must be 1-65535, got {self.port}")
        if self.guardrail_principles < 1:
            raise ConfigError(f"guardrail_principles: must be >= 1, got {self.guardrail_principles}")
        if isinstance(self.guardrail, str) and self.guardrail != "enforce":
            raise ConfigError(f"guardrail: true, false or enforce, got {self.guardrail!r}")
        if not self.auth and self.host not in LOOPBACK and not self.insecure_public:
            raise ConfigError(
                f"auth: false with host {self.host!r} would let anyone who reaches it use the models: keep auth "
                "on, bind 127.0.0.1, or set insecure_public: true"
            )
        if self.guard not in GUARDS:
            raise ConfigError(f"guard: one of {', '.join(GUARDS)}, got {self.guard!r}")
        self.classifier.validate("classifier")
        if self.guard == "classifier" and not self.classifier.path:
            raise ConfigError(
                "guard: classifier needs classifier.path (--classifiers DIR): a `cai-ray classifiers` OUTPUT folder"
            )
        self.method.validate("method")
        self.limits.validate("limits")
        self.reward.validate("reward")
        self.scaling.validate("scaling")
