"""`memshard unlearn`: remove a forget set from a trained model, register the result, audit it.

MODEL is `models:/NAME/VERSION`, `NAME/VERSION`, `NAME` (its latest version) or `runs:/RUN_ID/model`.
Its training run supplies the lineage: params `dataset.path` / `dataset.fingerprint` and the
artifact `config.json`. Approximate methods (SISS and the baselines in `unlearning.methods`) run
as one Ray task — with a GPU where the cluster has one — in a new MLflow run tagged
`memshard.source_run_id`; `retrain` reruns `memshard train` on X \\ A with the source run's
configuration (the exact gold standard). The result is registered as a new version of the source's
registered model, and an audit report (before vs after) is logged with it.

Every input is checked before a run starts: a bad forget set or a model without lineage is a
one-line error and nothing is logged or registered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from memshard.orchestrator.cluster import connect_ray
from memshard.config import Config, flatten, from_dict, parse_scalar, to_dict
from memshard.data import DATASET_FILE, ImageDataset, fingerprint_of, load_dataset
from memshard.errors import MemshardError
from memshard.orchestrator.pipeline_model import log_pipeline_model
from memshard.pipeline import build_pipeline, find_pipeline_dir, generate_images, image_grid, load_pipeline, save_pipeline
from memshard.orchestrator.tracking import connect_mlflow, resolve_tracking_uri, with_retries
from memshard.model import state_to_numpy
from memshard.shard_worker.scoring import score_samples
from memshard.unlearning.forget_set import parse_forget_spec
from memshard.unlearning.methods import METHODS as APPROXIMATE_METHODS
from memshard.unlearning.methods import UnlearnSettings, unlearn

ALL_METHODS = (*APPROXIMATE_METHODS, "retrain")
EXACTNESS = ("SISS and the naive, NegGrad and EraseDiff baselines are approximate: the forget set still shaped "
             "every training round (each round averages all shards), and these methods only push the model "
             "toward one trained without it. Retraining from scratch on the kept data is the only exact removal.")


@dataclass
class AuditSettings:
    num_images: int = 64  # generations per model
    sampling_steps: int = 50  # DDPM steps per generation (the audit compares models, not absolute quality)
    copy_threshold: float = 0.01  # a generation copies a forget image when mean((g − a)²) in [0, 1] pixels is below
    keep_samples: int = 256  # keep-set samples scored for the keep loss
    seed: int = 0
    repeats: int = 4  # fixed (t, ε) draws per scored sample


@dataclass(frozen=True)
class UnlearnResult:
    run_id: str
    registered_name: str
    registered_version: str
    report: dict
    report_dir: Path


@dataclass(frozen=True)
class Source:
    run_id: str
    registered_name: str
    model_uri: str
    config: Config
    dataset: ImageDataset


def unlearn_model(model: str, forget: str, method: str = "siss", steps: int | None = None,
                  sets: list[str] | None = None, tracking_uri: str | None = None) -> UnlearnResult:
    settings, audit, overrides = parse_sets(sets or [], steps)
    if method not in ALL_METHODS:
        raise MemshardError(f"unknown unlearning method {method!r}: choose one of {', '.join(ALL_METHODS)}")
    tracking_uri = resolve_tracking_uri(tracking_uri or overrides.get("mlflow.tracking_uri"))
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    source = resolve_source(client, model)
    experiment = overrides.get("mlflow.experiment", source.config.mlflow.experiment)
    connect_mlflow(tracking_uri, experiment)
    dataset = source.dataset
    forget_rows = parse_forget_spec(forget, dataset.sample_ids, dataset.content_hashes, dataset.images.shape[1:],
                                    lambda run_id: copied_ids(client, run_id, source.run_id))
    keep_rows = np.setdiff1d(np.arange(len(dataset)), forget_rows)
    forget_ids = [str(i) for i in dataset.sample_ids[forget_rows]]
    tags = {
        "memshard.source_run_id": source.run_id,
        "memshard.forget_hash": forget_hash(forget_ids),
        "memshard.forget_size": str(len(forget_rows)),
        "memshard.unlearn_method": method,
    }
    before = load_source_pipeline(source)
    if method == "retrain":
        return _retrain(client, source, tracking_uri, forget_rows, keep_rows, forget_ids, tags, before, audit)
    settings.check()
    tags["memshard.unlearn_steps"] = str(settings.steps)
    started_ray = connect_ray(source.config.ray.address)
    try:
        with mlflow.start_run() as run:
            with_retries(mlflow.set_tags, tags)
            with_retries(mlflow.log_params, {
                **{f"unlearn.{k}": v for k, v in dataclasses.asdict(settings).items()},
                **{f"audit.{k}": v for k, v in dataclasses.asdict(audit).items()},
                "unlearn.method": method, "forget.size": len(forget_rows), "forget.spec": forget[:400],
                "dataset.path": dataset.path, "dataset.fingerprint": dataset.fingerprint,
                "source.model": model,
            })
            with_retries(mlflow.log_dict, to_dict(source.config), "config.json")  # lineage for the next unlearn
            with_retries(mlflow.log_text, "\n".join(forget_ids) + "\n", "forget_ids.txt")
            weights, stats, device = _run_on_ray(method, before, source.config, dataset, keep_rows, forget_rows,
                                                 settings)
            after = build_pipeline(source.config, dataset.channels, weights)
            local = save_pipeline(after, Path(source.config.mlflow.checkpoint_dir).absolute() / run.info.run_id / "pipeline")
            with_retries(mlflow.set_tag, "device", device)
            compute = {"method": method, "steps": stats.steps, "seconds": stats.seconds, "device": device}
            report = build_report(client, source, tags, before, after, forget_rows, keep_rows, audit, compute)
            report_dir = _log_report(report, before, after, forget_rows, dataset, audit, local.parent / "audit")
            info = with_retries(log_pipeline_model, local, source.registered_name)
            version = str(info.registered_model_version)
            _tag_version(client, source.registered_name, version, tags)
            return UnlearnResult(run.info.run_id, source.registered_name, version, report, report_dir)
    finally:
        if started_ray:
            ray.shutdown()


# ---------------------------------------------------------------- inputs


def parse_sets(sets: list[str], steps: int | None) -> tuple[UnlearnSettings, AuditSettings, dict]:
    """`--set` keys: unlearning settings by name (lam, c, ...), `audit.NAME`, `mlflow.tracking_uri|experiment`."""
    fields = {f.name: f for f in dataclasses.fields(UnlearnSettings)}
    audit_fields = {f.name: f for f in dataclasses.fields(AuditSettings)}
    chosen, audit_chosen, overrides = {}, {}, {}
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        value = parse_scalar(text.strip())
        if not sep:
            raise MemshardError(f"--set {item!r} is not key=value: write e.g. --set c=5")
        if key in ("mlflow.tracking_uri", "mlflow.experiment"):
            overrides[key] = str(value)
            continue
        table, target, name = (audit_fields, audit_chosen, key[6:]) if key.startswith("audit.") else (fields, chosen, key)
        if name not in table:
            known = ", ".join([*fields, *(f"audit.{n}" for n in audit_fields), "mlflow.tracking_uri", "mlflow.experiment"])
            raise MemshardError(f"unknown unlearning setting {key!r}: use one of {known}")
        default = table[name].default
        if isinstance(default, bool) or not isinstance(value, (int, float)) or isinstance(value, bool) or (
                isinstance(default, int) and not float(value).is_integer()):
            raise MemshardError(f"--set {key}={text} must be a {type(default).__name__}")
        target[name] = type(default)(value)
    if steps is not None:
        chosen["steps"] = steps
    audit = AuditSettings(**audit_chosen)
    if audit.num_images < 2 or audit.sampling_steps < 1 or audit.keep_samples < 1 or audit.copy_threshold <= 0:
        raise MemshardError("audit settings: num_images ≥ 2, sampling_steps ≥ 1, keep_samples ≥ 1 and "
                            "copy_threshold > 0 are required: fix the audit.* --set values")
    settings = UnlearnSettings(**chosen)
    settings.check()
    return settings, audit, overrides


def resolve_source(client: MlflowClient, model: str) -> Source:
    """The model's registered name, its training run, the run's configuration and training data."""
    model = model.strip()
    try:
        if model.startswith("runs:/"):
            run_id = model[len("runs:/"):].split("/", 1)[0]
            model_uri, name = model, None
        else:
            name, _, version = model.removeprefix("models:/").partition("/")
            if not version:
                versions = client.search_model_versions(f"name='{name}'")
                if not versions:
                    raise MemshardError(f"no registered model {name!r} in this tracking store: check the name "
                                        "(or MLFLOW_TRACKING_URI)")
                version = str(max(int(v.version) for v in versions))
            run_id = client.get_model_version(name, version).run_id
            model_uri = f"models:/{name}/{version}"
        run = client.get_run(run_id)
    except MemshardError:
        raise
    except MlflowException as error:
        reason = str(error).splitlines()[0][:160]
        raise MemshardError(f"cannot find model {model} ({reason}): pass models:/NAME/VERSION, NAME/VERSION, "
                            "NAME or runs:/RUN_ID/model") from None
    params = run.data.params
    if not run_id or "dataset.path" not in params or "dataset.fingerprint" not in params:
        raise MemshardError(f"model {model} has no training lineage (its run {run_id} logged no dataset.path / "
                            "dataset.fingerprint): unlearning needs a model trained by memshard train")
    try:
        config = from_dict(json.loads(Path(client.download_artifacts(run_id, "config.json", tempfile.mkdtemp())).read_text()))
    except (MlflowException, OSError, ValueError):
        raise MemshardError(f"model {model} has no training lineage (its run {run_id} has no config.json): "
                            "unlearning needs a model trained by memshard train") from None
    try:
        dataset = load_dataset(params["dataset.path"])
    except MemshardError as error:
        raise MemshardError(f"the training data of run {run_id} cannot be read ({error}): restore it") from None
    if dataset.fingerprint != params["dataset.fingerprint"]:
        raise MemshardError(f"the dataset at {dataset.path} changed since run {run_id} was trained (fingerprint "
                            "differs): restore the original data")
    return Source(run_id, name or config.mlflow.register_as, model_uri, config, dataset)


def copied_ids(client: MlflowClient, evaluation_run_id: str, source_run_id: str) -> list[str]:
    """The sample ids an evaluation run found copied at least once (copies_per_sample.parquet)."""
    try:
        run = client.get_run(evaluation_run_id)
        evaluated = run.data.tags.get("memshard.source_run_id")
        if evaluated != source_run_id:
            raise MemshardError(f"evaluation run {evaluation_run_id} evaluated run {evaluated}, not this model's run "
                                f"{source_run_id}: pass an evaluation of this model")
        path = client.download_artifacts(evaluation_run_id, "copies_per_sample.parquet", tempfile.mkdtemp())
    except MlflowException:
        raise MemshardError(f"evaluation run {evaluation_run_id} or its copies_per_sample.parquet was not found: "
                            "run memshard evaluate on the model first") from None
    table = pq.read_table(path, columns=["sample_id", "copies"]).to_pandas()
    return table.loc[table["copies"] > 0, "sample_id"].astype(str).tolist()


def forget_hash(forget_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(forget_ids)).encode()).hexdigest()


def load_source_pipeline(source: Source):
    target = Path(tempfile.mkdtemp(prefix="memshard-unlearn-"))
    mlflow.artifacts.download_artifacts(artifact_uri=source.model_uri, dst_path=str(target))
    return load_pipeline(find_pipeline_dir(target, source.model_uri), "cpu")


# ---------------------------------------------------------------- running a method


@ray.remote
def _unlearn_task(method, weights, config_tree, channels, keep_images, forget_images, settings):
    from memshard.config import from_dict as _from_dict
    from memshard.model import build_scheduler, build_unet, load_numpy_state, resolve_device

    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    torch.set_num_threads(max(1, cpus))
    cfg = _from_dict(config_tree)
    device = resolve_device("auto")
    unet = build_unet(cfg, channels)
    load_numpy_state(unet, weights)
    unet.to(device)
    stats = unlearn(method, unet, build_scheduler(cfg), keep_images, forget_images, settings)
    return state_to_numpy(unet), stats, str(device)


def _run_on_ray(method, pipeline, cfg: Config, dataset, keep_rows, forget_rows, settings):
    """One Ray task: on a GPU when the cluster has one, else one CPU."""
    gpu = ray.cluster_resources().get("GPU", 0) >= 1
    options = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
    task = _unlearn_task.options(**options).remote(
        method, state_to_numpy(pipeline.unet), to_dict(cfg), dataset.channels,
        dataset.images[keep_rows], dataset.images[forget_rows], settings)
    return ray.get(task)


def _retrain(client, source, tracking_uri, forget_rows, keep_rows, forget_ids, tags, before, audit) -> UnlearnResult:
    from memshard.orchestrator.train import train

    data_dir = Path(source.config.data.cache_dir).absolute() / f"unlearn-{tags['memshard.forget_hash'][:16]}"
    write_subset(source.dataset, keep_rows, data_dir)
    cfg = from_dict(to_dict(source.config))
    cfg.data.path = str(data_dir)
    cfg.mlflow.tracking_uri = tracking_uri
    cfg.mlflow.register_as = source.registered_name
    steps = cfg.iet.rounds * cfg.iet.local_steps * (1 if cfg.iet.method == "ddpm" else cfg.iet.shards)
    tags["memshard.unlearn_steps"] = str(steps)
    started = time.perf_counter()
    result = train(cfg, show_progress=False)
    seconds = time.perf_counter() - started
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=result.run_id):
        with_retries(mlflow.set_tags, tags)
        with_retries(mlflow.log_text, "\n".join(forget_ids) + "\n", "forget_ids.txt")
        with_retries(mlflow.log_metric, "unlearn_seconds", seconds)
        after = load_pipeline(result.local_pipeline, "cpu")
        compute = {"method": "retrain", "steps": steps, "seconds": seconds, "device": "see the run's devices tag"}
        report = build_report(client, source, tags, before, after, forget_rows, keep_rows, audit, compute)
        report_dir = _log_report(report, before, after, forget_rows, source.dataset, audit,
                                 result.local_pipeline.parent / "audit")
    _tag_version(client, source.registered_name, result.registered_version, tags)
    return UnlearnResult(result.run_id, source.registered_name, result.registered_version, report, report_dir)


def write_subset(dataset: ImageDataset, rows: np.ndarray, out_dir: Path) -> Path:
    """The prepared dataset restricted to `rows`, ids and bytes unchanged, metadata updated."""
    file = Path(dataset.path) / DATASET_FILE
    table = pq.read_table(file)
    subset = table.take(pa.array(rows))
    meta = dict(table.schema.metadata or {})
    meta[b"memshard.count"] = str(len(rows)).encode()
    meta[b"memshard.fingerprint"] = fingerprint_of(dataset.sample_ids[rows], dataset.images[rows]).encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{DATASET_FILE}.tmp"
    pq.write_table(subset.replace_schema_metadata(meta), tmp)
    tmp.replace(out_dir / DATASET_FILE)
    return out_dir


def _tag_version(client: MlflowClient, name: str, version: str, tags: dict) -> None:
    for key, value in tags.items():
        with_retries(client.set_model_version_tag, name, version, key, value)


# ---------------------------------------------------------------- the audit


def measure(pipeline, dataset: ImageDataset, forget_rows, keep_rows, audit: AuditSettings) -> dict:
    """Forget/keep losses at fixed (t, ε), copies of each distinct forget image among generations, FID."""
    from memshard.evaluation.fid import PIXEL_PROJECTION, feature_space, fid
    from memshard.evaluation.nearest_neighbors import nearest_neighbors

    unet, scheduler = pipeline.unet, pipeline.scheduler
    keep_scored = np.sort(np.random.default_rng(audit.seed).choice(keep_rows, min(audit.keep_samples, len(keep_rows)),
                                                                   replace=False))
    forget_loss = score_samples(unet, scheduler, dataset.images, forget_rows, audit.seed, audit.repeats)
    keep_loss = score_samples(unet, scheduler, dataset.images, keep_scored, audit.seed, audit.repeats)
    generated = generate_images(pipeline, audit.num_images, audit.seed, audit.sampling_steps).transpose(0, 3, 1, 2)
    distinct = _distinct_rows(dataset, forget_rows)
    pixels = int(np.prod(dataset.images.shape[1:]))
    near = nearest_neighbors(dataset.images[distinct], generated, k=len(generated), scale=1 / 255, device="cpu")
    per_pixel = near.sq_distances / pixels  # (forget images, generations), ascending
    copy_fraction = (per_pixel < audit.copy_threshold).mean(axis=1)
    space = feature_space(PIXEL_PROJECTION)
    return {
        "forget_loss": float(forget_loss.mean()),
        "keep_loss": float(keep_loss.mean()),
        "copy_fraction_mean": float(copy_fraction.mean()),
        "copy_fraction_max": float(copy_fraction.max()),
        "per_image": [{"sample_id": str(dataset.sample_ids[row]), "copies_in_dataset": int(count),
                       "copy_fraction": float(frac), "nearest_generation": int(near.indices[i, 0]),
                       "nearest_mse": float(per_pixel[i, 0])}
                      for i, (row, count, frac) in enumerate(zip(distinct, _counts(dataset, distinct, forget_rows),
                                                                 copy_fraction))],
        "fid": fid(generated, dataset.images[keep_scored], space),
        "fid_feature_space": PIXEL_PROJECTION,
        "_generated": generated,
    }


def _distinct_rows(dataset: ImageDataset, rows: np.ndarray) -> np.ndarray:
    _, first = np.unique(dataset.content_hashes[rows], return_index=True)
    return rows[np.sort(first)]


def _counts(dataset: ImageDataset, distinct: np.ndarray, rows: np.ndarray) -> list[int]:
    hashes = dataset.content_hashes[rows]
    return [int((hashes == dataset.content_hashes[row]).sum()) for row in distinct]


def build_report(client, source, tags, before, after, forget_rows, keep_rows, audit, compute) -> dict:
    dataset = source.dataset
    measured_before = measure(before, dataset, forget_rows, keep_rows, audit)
    measured_after = measure(after, dataset, forget_rows, keep_rows, audit)
    report = {
        "source_run_id": source.run_id, "registered_model": source.registered_name,
        "forget_hash": tags["memshard.forget_hash"], "forget_size": len(forget_rows), "keep_size": len(keep_rows),
        "method": compute["method"], "audit_settings": dataclasses.asdict(audit),
        "before": _public(measured_before), "after": _public(measured_after),
        "compute": compute, "retrain": None, "exactness": EXACTNESS,
        "_generated_before": measured_before["_generated"], "_generated_after": measured_after["_generated"],
    }
    if compute["method"] != "retrain":
        report["retrain"] = _retrain_numbers(client, source, tags, dataset, forget_rows, keep_rows, audit)
    return report


def _public(measured: dict) -> dict:
    return {k: v for k, v in measured.items() if not k.startswith("_")}


def _retrain_numbers(client, source, tags, dataset, forget_rows, keep_rows, audit) -> dict | None:
    """The retrained model's numbers and compute, when a retrain of this forget set exists."""
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=(f"tags.`memshard.source_run_id` = '{source.run_id}' and tags.`memshard.unlearn_method` = "
                       f"'retrain' and tags.`memshard.forget_hash` = '{tags['memshard.forget_hash']}'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    versions = client.search_model_versions(f"run_id='{run.info.run_id}'")
    if not versions:
        return None
    uri = f"models:/{versions[0].name}/{versions[0].version}"
    retrained = load_source_pipeline(dataclasses.replace(source, model_uri=uri))
    return {"run_id": run.info.run_id, "model": uri, "steps": int(run.data.tags.get("memshard.unlearn_steps", 0)),
            "seconds": run.data.metrics.get("unlearn_seconds"),
            "measures": _public(measure(retrained, dataset, forget_rows, keep_rows, audit))}


def _log_report(report: dict, before, after, forget_rows, dataset, audit, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    gen_before, gen_after = report.pop("_generated_before"), report.pop("_generated_after")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(format_report(report))
    tiles = []
    for b, a in zip(report["before"]["per_image"][:16], report["after"]["per_image"][:16]):
        row = int(np.flatnonzero(dataset.sample_ids == b["sample_id"])[0])
        tiles += [dataset.images[row], gen_before[b["nearest_generation"]], gen_after[a["nearest_generation"]]]
    image_grid(np.stack(tiles).transpose(0, 2, 3, 1), columns=3).save(out_dir / "nearest.png")
    for name in ("report.json", "report.md", "nearest.png"):
        with_retries(mlflow.log_artifact, str(out_dir / name), "audit")
    metrics = {}
    for when in ("before", "after"):
        for key in ("forget_loss", "keep_loss", "copy_fraction_mean", "fid"):
            metrics[f"{key}_{when}"] = report[when][key]
    metrics["unlearn_seconds"] = report["compute"]["seconds"]
    with_retries(mlflow.log_metrics, metrics)
    return out_dir


def format_report(report: dict) -> str:
    b, a, c = report["before"], report["after"], report["compute"]
    rows = [("forget-set loss at fixed (t, ε)", "forget_loss"), ("keep-set loss at fixed (t, ε)", "keep_loss"),
            ("fraction of generations copying a forget image (mean)", "copy_fraction_mean"),
            ("same, worst forget image", "copy_fraction_max"), (f"FID vs keep set ({b['fid_feature_space']})", "fid")]
    retrain = report.get("retrain")
    head = "| measure | before | after |" + (" retrained |" if retrain else "")
    lines = [f"# Unlearning audit: {report['method']}", "",
             f"Source run {report['source_run_id']}, model {report['registered_model']}; forget set of "
             f"{report['forget_size']} samples (hash {report['forget_hash'][:16]}), {report['keep_size']} kept.", "",
             head, "| --- | --- | --- |" + (" --- |" if retrain else "")]
    for label, key in rows:
        line = f"| {label} | {b[key]:.4f} | {a[key]:.4f} |"
        if retrain:
            line += f" {retrain['measures'][key]:.4f} |"
        lines.append(line)
    s = report["audit_settings"]
    lines += ["", f"Copy: mean squared pixel distance in [0, 1] below {s['copy_threshold']} among {s['num_images']} "
              f"generations ({s['sampling_steps']} DDPM steps, seed {s['seed']}). FID here is in the offline "
              f"{b['fid_feature_space']} space on {s['num_images']} images: comparable only within this report.",
              "", f"Compute: {c['steps']} steps in {c['seconds']:.1f} s on {c['device']}."]
    if retrain:
        lines.append(f"Retrain ({retrain['run_id']}): {retrain['steps']} steps in "
                     f"{retrain['seconds'] or float('nan'):.1f} s.")
    elif report["method"] != "retrain":
        lines.append("No retrain of this forget set exists yet: run `memshard unlearn ... --method retrain` for the exact "
                     "reference.")
    lines += ["", "Nearest generation to each forget image: audit/nearest.png (columns: forget image, before, after).",
              "", f"**Exactness.** {EXACTNESS}", ""]
    return "\n".join(lines)


def run_unlearn_command(args) -> int:
    """`memshard unlearn` (see memshard/cli.py)."""
    result = unlearn_model(args.model, args.forget, args.method, args.steps, args.set)
    before, after = result.report["before"], result.report["after"]
    print(f"run id: {result.run_id}")
    print(f"registered model: {result.registered_name} version {result.registered_version}")
    print(f"forget-set loss {before['forget_loss']:.4f} -> {after['forget_loss']:.4f}, keep-set loss "
          f"{before['keep_loss']:.4f} -> {after['keep_loss']:.4f}, copy fraction {before['copy_fraction_mean']:.3f} -> "
          f"{after['copy_fraction_mean']:.3f}")
    print(f"audit report: {result.report_dir / 'report.md'}")
    if result.report["method"] != "retrain":
        print("note: this removal is approximate; --method retrain is exact")
    return 0
