"""From configuration to loadable models: resolve paths, pick devices and backend kinds.

Tasks configured with the same file and load settings share one model (the
default SmolLM2 serves rerank and expansion from one load).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from .backend_api import TASKS
from .config import DEFAULT_RERANK_TEMPLATE, Config, ConfigError, ModelConfig
from .model_store import default_for_task
from .worker_protocol import ModelSpec

RERANK_OPTIONS = ("template", "instruction", "yes_token", "no_token")
EXPAND_OPTIONS = (
    "max_tokens", "max_lines", "max_line_chars", "temperature", "top_k", "top_p",
    "presence_penalty", "seed",
)
# (task, device) -> backend kind understood by the worker.
KINDS = {
    ("embed", "cpu"): "llama_cpp_embed",
    ("rerank", "cpu"): "llama_cpp_generative",
    ("expand", "cpu"): "llama_cpp_generative",
}


@dataclass
class ModelPlan:
    spec: ModelSpec
    device: str
    name: str
    tasks: list[str] = field(default_factory=list)
    device_reason: str = ""


def _resolve_path(cfg: Config, mc: ModelConfig) -> tuple[Path, str, dict[str, object]]:
    """(file, name, the model's own option defaults)."""
    if mc.path:
        path = Path(mc.path)
        if not path.is_absolute():
            path = cfg.models_dir / path
        return path, mc.name or path.stem, {}
    rec = default_for_task(cfg.models_dir, mc.task)
    if rec is None:
        # Not fatal: /health reports it and `npuserve models prepare` fixes it.
        missing = cfg.models_dir / f"<no {mc.task} model: run `npuserve models prepare`>"
        return missing, mc.name or f"unprepared-{mc.task}", {}
    return cfg.models_dir / rec.file, mc.name or rec.name, dict(rec.options)


def _choose_device(mc: ModelConfig) -> tuple[str, str]:
    if mc.device == "npu":
        raise ConfigError(
            f"models.{mc.task}.device: 'npu' needs an RKNN model directory; GGUF models run on cpu"
        )
    if mc.device == "auto":
        return "cpu", "auto: no NPU backend for a GGUF model"
    return "cpu", "configured"


def plan_models(cfg: Config) -> tuple[dict[str, ModelPlan], dict[str, str]]:
    """Models keyed by id, and the model id serving each task."""
    plans: dict[str, ModelPlan] = {}
    task_model: dict[str, str] = {}
    for task in TASKS:
        mc = cfg.model(task)
        path, name, model_defaults = _resolve_path(cfg, mc)
        device, reason = _choose_device(mc)
        kind = KINDS[(task, device)]
        key = f"{kind}|{path}|{mc.n_ctx}|{mc.threads}"
        model_id = f"{name}@{device}-" + hashlib.sha1(key.encode()).hexdigest()[:8]
        plan = plans.get(model_id)
        if plan is None:
            plan = ModelPlan(
                spec=ModelSpec(model_id, kind, str(path), mc.n_ctx, mc.threads),
                device=device,
                name=name,
                device_reason=reason,
            )
            plans[model_id] = plan
        plan.tasks.append(task)
        own = RERANK_OPTIONS if task == "rerank" else EXPAND_OPTIONS if task == "expand" else ()
        mine = {k: mc.options[k] for k in own}
        # An option left empty in the config takes the model's own default.
        mine |= {k: v for k, v in model_defaults.items() if k in own and mine.get(k) == ""}
        if task == "rerank" and not mine["template"]:
            mine["template"] = DEFAULT_RERANK_TEMPLATE
        options = dict(plan.spec.options) | mine
        plan.spec = ModelSpec(
            model_id, kind, str(path), mc.n_ctx, mc.threads, tuple(sorted(options.items()))
        )
        task_model[task] = model_id
    return plans, task_model
