"""`cai-ray pipeline`'s config: the whole method, one section per stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cai_ray.config import ConfigError, setting

RL_STAGES = ("ppo", "dpo")


def _section(help: str):
    return field(default_factory=dict, metadata={"help": help})


@dataclass(frozen=True)
class PipelineConfig:
    """`cai-ray pipeline`: the whole method, each stage's output feeding the next:
    generate (SL-CAI data) → sft → label (pairs from the SFT policy, AI labels) → rm (preference
    model; ppo only) → rl (ppo, or dpo on the labels) → eval (base vs SL-CAI vs RL-CAI).
    Each stage section takes that job's own config keys; the pipeline sets the wiring keys."""

    output: str = setting("", "run folder: one subfolder per stage, pipeline.json (the lineage of every artifact)")
    model: str = setting(
        "smollm2", "the base model: writes the SL-CAI answers and revisions, is fine-tuned, is eval's 'base'"
    )
    prompts: str = setting("", "red-team prompts: SL-CAI data, the policy's answer pairs for labeling, RL prompts")
    rl_prompts: str | None = setting(
        None, "PPO's prompts when not `prompts` (a local file: RL needs thousands, not millions)"
    )
    constitution: str = setting("constitutions/general.yaml", "the constitution every stage uses")
    rl: str = setting(
        "ppo", "ppo (preference model, then PPO against it) | dpo (DPO on the AI labels, no preference model)"
    )
    seed: int = setting(0, "seed of every stage")
    ray_address: str | None = setting(None, "join this Ray cluster; default: start a local one")
    prune_checkpoints: bool = setting(
        False,
        "delete a training stage's Ray Train checkpoints (STAGE/ray: weights and optimiser states, several times "
        "the model's size) once it finished and wrote its model; that stage can then not be continued to more steps",
    )
    generate: dict[str, Any] = _section(
        "`cai-ray generate` keys (input, output, constitution, seed: set by the pipeline)"
    )
    sft: dict[str, Any] = _section(
        "`cai-ray train sft` keys (data, output: set by the pipeline; model defaults to `model`)"
    )
    label: dict[str, Any] = _section(
        "`cai-ray label` keys (input, output, policy.model = the SFT model: set by the pipeline)"
    )
    rm: dict[str, Any] = _section("`cai-ray train rm` keys (data, output: set; model defaults to the SFT model)")
    ppo: dict[str, Any] = _section("`cai-ray train ppo` keys (data, output, model, reward.model: set by the pipeline)")
    dpo: dict[str, Any] = _section("`cai-ray train dpo` keys (data, output, model: set by the pipeline)")
    eval: dict[str, Any] = _section("`cai-ray eval` keys (harmful and benign needed; models, baseline, output: set)")

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("output: required (the run folder)")
        if "://" in self.output:
            raise ConfigError(
                f"output: {self.output!r}: the pipeline's run folder (pipeline.json, the lineage, and each stage's "
                "folder) must be a folder (local or a shared mount); run its steps alone for object-store outputs"
            )
        if not self.prompts:
            raise ConfigError("prompts: required (a red-team prompt file)")
        if self.rl not in RL_STAGES:
            raise ConfigError(f"rl: must be ppo or dpo, got {self.rl!r}")
        from cai_ray.pipeline.run import stage_configs

        stage_configs(self)  # every stage's config is built and validated before anything runs
