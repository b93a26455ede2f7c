"""From configuration to loadable models: resolve paths, pick devices and backend kinds.

Tasks configured with the same file and load settings share one model (the
default SmolLM2 serves rerank and expansion from one load). A task whose path
is an NPU model directory runs on the NPU when the board has one, and has a
CPU twin (a GGUF file) that takes its work when the NPU is missing or fails.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from npuserve.daemon.config import DEFAULT_RERANK_TEMPLATE, Config, ConfigError, ModelConfig
from npuserve.daemon.models.backend_api import TASKS
from npuserve.daemon.models.backends import is_npu_model, kind, kind_for, weight_files
from npuserve.daemon.models.store import default_for_task
from npuserve.daemon.worker.protocol import ModelSpec

if TYPE_CHECKING:  # the NPU probes stay unimported until an NPU model is configured
    from npuserve.npu.detect import NpuReport

RERANK_OPTIONS = ("template", "instruction", "yes_token", "no_token", "lanes")
EXPAND_OPTIONS = (
    "max_tokens", "max_lines", "max_line_chars", "temperature", "top_k", "top_p",
    "presence_penalty", "seed",
)
OLLAMA_OPTIONS = ("ollama_url", "ollama_model", "ollama_timeout", "ollama_retries")


@dataclass
class ModelPlan:
    spec: ModelSpec
    device: str
    name: str
    tasks: list[str] = field(default_factory=list)
    device_reason: str = ""
    twin: str | None = None  # model id of the CPU twin of an NPU model
    files: list[str] = field(default_factory=list)  # what a load reads (read ahead)


@dataclass
class NpuStatus:
    available: bool
    runtime: str  # rknnlite | reference
    reason: str
    cores: int = 3  # the SoC's NPU cores
    target: str | None = None  # the rknn-toolkit2 platform its graphs must be built for
    rkllm_reason: str | None = None  # why RKLLM cannot run here (None: it can)


def npu_status(cfg: Config, root: str = "/") -> NpuStatus:
    runtime = cfg.get("npu.runtime")
    if runtime == "reference":
        return NpuStatus(True, "reference", "reference runtimes (ONNX twins on onnxruntime, GGUF"
                         " twins on the reference librkllmrt)")
    from npuserve.npu.detect import detect

    report = detect(root)
    prof = report.profile
    cores, target = (prof.cores, prof.target) if prof else (3, None)
    rkllm = None if report.rkllm_usable else (
        "; ".join(p for p, _ in report.rkllm_problems) or "librkllmrt is not usable")
    if report.usable:
        return NpuStatus(True, "rknnlite", report.verdict(), cores, target, rkllm)
    reasons = "; ".join(p for p, _ in report.problems) or "no NPU"
    return NpuStatus(False, "rknnlite", reasons, cores, target, rkllm)


def _built_for(path: Path) -> str | None:
    """The SoC a model directory was built for (None: unknown or unreadable)."""
    from npuserve.npu.model_dir import ManifestError, load_manifest
    from npuserve.npu.rkllm_dir import RkllmDirError, is_rkllm_dir, load_rkllm_manifest

    try:
        if is_rkllm_dir(path):
            return load_rkllm_manifest(path).target_platform
        model = load_manifest(path)
    except (ManifestError, RkllmDirError):
        return None  # reported by doctor; loading fails over to the twin
    # Manifests before target_platform was recorded were all built for the rk3588.
    return model.target_platform or ("rk3588" if model.toolkit_version else None)


def _npu_problem(path: Path, npu: NpuStatus) -> str | None:
    """Why a model directory cannot run on this board's NPU, though the NPU is usable:
    built for another SoC, or an RKLLM model where RKLLM cannot run."""
    from npuserve.npu.rkllm_dir import RkllmDirError, is_rkllm_dir, load_rkllm_manifest

    if is_rkllm_dir(path) and npu.runtime != "reference":
        if npu.rkllm_reason:
            return f"RKLLM cannot run here: {npu.rkllm_reason}"
        try:
            if not load_rkllm_manifest(path).rkllm:
                return "no .rkllm file in its directory (the reference runtime's only)"
        except RkllmDirError:
            return None  # reported by doctor; loading fails over to the twin
    return _target_problem(path, npu.target)


def _target_problem(path: Path, target: str | None) -> str | None:
    """Why a model directory's graphs cannot run on this SoC (built for another one)."""
    if target is None:
        return None
    built_for = _built_for(path)
    if built_for and built_for != target:
        return (f"its graphs were built for the {built_for}, this board is an {target}"
                f" (npuserve convert --target {target})")
    return None


def npu_model_problems(cfg: Config, report: NpuReport) -> list[tuple[str, str]]:
    """(problem, fix) for each configured NPU model directory that the board's runtime
    cannot load (too new for its librknnrt, built for another SoC) or that cannot be
    read, for `npuserve doctor`."""
    from npuserve.npu.detect import model_version_problem
    from npuserve.npu.model_dir import ManifestError, load_manifest
    from npuserve.npu.rkllm_dir import is_rkllm_dir

    problems: list[tuple[str, str]] = []
    for task in TASKS:
        mc = cfg.model(task)
        if mc.options["backend"] == "ollama" or not mc.path:
            continue
        path = _absolute(cfg, mc.path)
        if not is_npu_model(path):
            continue
        if is_rkllm_dir(path):
            problems += _rkllm_problems(task, path, report)
            continue
        try:
            model = load_manifest(path)
        except ManifestError as exc:
            problems.append((f"models.{task}: {exc}", "convert the model again"
                             " (npuserve convert) or fix its manifest.json"))
            continue
        problem = model_version_problem(f"models.{task} ({model.name})",
                                        model.toolkit_version, report.runtime_version)
        if problem:
            problems.append(problem)
        problems += _wrong_target(task, model.name, path, report,
                                  "convert it again with --target {target}")
    return problems


def _wrong_target(task: str, name: str, path: Path, report: NpuReport, fix: str
                  ) -> list[tuple[str, str]]:
    """A model directory built for another SoC than the board's, for doctor (`fix` may
    name the board's {target})."""
    target = report.profile.target if report.profile else None
    wrong = _target_problem(path, target)
    return ([(f"models.{task} ({name}): {wrong}; it runs on the CPU",
              fix.format(target=target))] if wrong else [])


def _rkllm_problems(task: str, path: Path, report: NpuReport) -> list[tuple[str, str]]:
    """What keeps a configured RKLLM directory off this board's NPU, for doctor."""
    from npuserve.npu.rkllm_dir import RkllmDirError, load_rkllm_manifest

    try:
        model = load_rkllm_manifest(path)
    except RkllmDirError as exc:
        return [(f"models.{task}: {exc}", "make it again (npuserve convert --runtime"
                 " rkllm) or fix its manifest.json")]
    problems = [(f"models.{task} ({model.name}): {p}; it runs on the CPU", fix)
                for p, fix in report.rkllm_problems]
    if not model.rkllm:
        problems.append((f"models.{task} ({model.name}): no .rkllm file in the directory;"
                         " it runs on the CPU", "convert the model with Rockchip's"
                         " rkllm-toolkit, then npuserve convert --runtime rkllm --rkllm FILE"))
    return problems + _wrong_target(task, model.name, path, report,
                                    "convert it with rkllm-toolkit for the {target}")


def _absolute(cfg: Config, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else cfg.models_dir / p


def _resolve_path(cfg: Config, mc: ModelConfig) -> tuple[Path, str, dict[str, object]]:
    """(file or model directory, name, the model's own option defaults)."""
    if mc.path:
        path = _absolute(cfg, mc.path)
        return path, mc.name or path.stem, {}
    return _default(cfg, mc)


def _default(cfg: Config, mc: ModelConfig) -> tuple[Path, str, dict[str, object]]:
    rec = default_for_task(cfg.models_dir, mc.task)
    if rec is None:
        # Not fatal: /health reports it and `npuserve models prepare` fixes it.
        missing = cfg.models_dir / f"<no {mc.task} model: run `npuserve models prepare`>"
        return missing, mc.name or f"unprepared-{mc.task}", {}
    return cfg.models_dir / rec.file, mc.name or rec.name, dict(rec.options)


def _model_id(name: str, device: str, kind: str, path: Path, mc: ModelConfig) -> str:
    key = f"{kind}|{path}|{mc.n_ctx}|{mc.threads}"
    return f"{name}@{device}-" + hashlib.sha1(key.encode()).hexdigest()[:8]


def _task_options(task: str, mc: ModelConfig, model_defaults: dict[str, object]
                  ) -> dict[str, object]:
    own = RERANK_OPTIONS if task == "rerank" else EXPAND_OPTIONS if task == "expand" else ()
    # One model file may serve rerank and expansion with different attention kernels.
    flash = "flash_attn" if task == "embed" else f"{task}_flash_attn"
    mine = {k: mc.options[k] for k in own} | {flash: mc.options["flash_attn"],
                                               "n_ubatch": mc.options["n_ubatch"]}
    # An option left empty in the config takes the model's own default.
    mine |= {k: v for k, v in model_defaults.items() if k in own and mine.get(k) == ""}
    if task == "rerank" and not mine["template"]:
        mine["template"] = DEFAULT_RERANK_TEMPLATE
    return mine


def _add(plans: dict[str, ModelPlan], task: str, device: str, path: Path, name: str,
         mc: ModelConfig, options: dict[str, object], reason: str) -> ModelPlan:
    backend = kind_for(task, device, path)
    if backend is None:
        raise ConfigError(f"models.{task}: no {device} backend for the {task} task yet")
    kind = backend.name
    model_id = _model_id(name, device, kind, path, mc)
    plan = plans.get(model_id)
    if plan is None:
        plan = ModelPlan(ModelSpec(model_id, kind, str(path), mc.n_ctx, mc.threads), device,
                         name, device_reason=reason)
        plans[model_id] = plan
    if task not in plan.tasks:
        plan.tasks.append(task)
    merged = dict(plan.spec.options) | options
    plan.spec = ModelSpec(model_id, kind, str(path), mc.n_ctx, mc.threads,
                          tuple(sorted(merged.items())))
    return plan


def _plan_remote(plans: dict[str, ModelPlan], task: str, mc: ModelConfig) -> str:
    """A task served by an Ollama-compatible server (rkllama on the NPU, say)."""
    url, model = mc.options["ollama_url"], mc.options["ollama_model"]
    if not url or not model:
        raise ConfigError(f"models.{task}: backend = ollama needs ollama_url and ollama_model")
    options = _task_options(task, mc, {}) | {k: mc.options[k] for k in OLLAMA_OPTIONS}
    plan = _add(plans, task, "remote", Path(model), mc.name or model, mc, options,
                f"Ollama-compatible server at {url}")
    return plan.spec.model_id


def plan_models(cfg: Config, root: str = "/") -> tuple[dict[str, ModelPlan], dict[str, str]]:
    """Models keyed by id, and the model id serving each task (`root`: the machine's /,
    or a tree standing in for a board's)."""
    plans: dict[str, ModelPlan] = {}
    task_model: dict[str, str] = {}
    npu: NpuStatus | None = None
    for task in TASKS:
        mc = cfg.model(task)
        if mc.options["backend"] == "ollama":
            task_model[task] = _plan_remote(plans, task, mc)
            continue
        path, name, model_defaults = _resolve_path(cfg, mc)
        options = _task_options(task, mc, model_defaults)
        if not is_npu_model(path):
            if mc.device == "npu":
                raise ConfigError(f"models.{task}.device: 'npu' needs an NPU model directory"
                                  " (see `npuserve convert`); GGUF models run on the cpu")
            reason = "configured" if mc.device == "cpu" else "auto: a GGUF model runs on the cpu"
            plan = _add(plans, task, "cpu", path, name, mc, options, reason)
            task_model[task] = plan.spec.model_id
            continue
        # An NPU model directory, with its CPU twin.
        twin_path, twin_name, twin_defaults = (
            (_absolute(cfg, mc.cpu_path), Path(mc.cpu_path).stem, {}) if mc.cpu_path
            else _default(cfg, mc))
        twin = _add(plans, task, "cpu", twin_path, twin_name, mc,
                    _task_options(task, mc, twin_defaults), "CPU twin of an NPU model")
        npu = npu or npu_status(cfg, root)
        wrong_target = _npu_problem(path, npu) if npu.available else None
        if mc.device == "cpu" or not npu.available or wrong_target:
            why = ("configured" if mc.device == "cpu" else f"no usable NPU: {npu.reason}"
                   if not npu.available else f"not on the NPU: {wrong_target}")
            twin.device_reason = why
            task_model[task] = twin.spec.model_id
            continue
        # One context per core the SoC has, unless the config asks for fewer.
        cores = int(cfg.get("npu.cores")) or npu.cores
        options |= {"npu_runtime": npu.runtime, "npu_cores": min(cores, npu.cores),
                    "rkllm_library": cfg.get("npu.rkllm_library")}
        plan = _add(plans, task, "npu", path, name, mc, options, npu.reason)
        plan.twin = twin.spec.model_id
        task_model[task] = plan.spec.model_id
    _generation(plans, task_model)
    for plan in plans.values():
        plan.files = weight_files(plan.spec)
    return plans, task_model


def _generation(plans: dict[str, ModelPlan], task_model: dict[str, str]) -> None:
    """Chat and completion endpoints generate with the expansion model where its backend
    can (its CPU twin too, for when an NPU model falls back)."""
    expand = plans[task_model["expand"]]
    twin = plans.get(expand.twin) if expand.twin else None
    able = [p for p in (expand, twin) if p is not None and _generates(p)]
    if expand not in able:
        return
    task_model["generate"] = expand.spec.model_id
    for plan in able:
        if "generate" not in plan.tasks:
            plan.tasks.append("generate")


def _generates(plan: ModelPlan) -> bool:
    backend = kind(plan.spec.kind)
    return backend is not None and "generate" in backend.tasks
