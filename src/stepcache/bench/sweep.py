"""``stepcache bench``'s library side: sweep policies x settings on one model and write the results.

The uncached run (``NoCache``) is the PSNR / SSIM reference and the speedup's denominator: it runs in
every timing round beside the policies (interleaved rounds, the speedup is the median of the per-round
ratios, see ``runner.interleaved``). Configs whose key is already in the JSONL file are not re-measured
unless ``force`` (the baseline is re-sampled only when a config needs it, and never appended twice;
``force`` replaces the old records).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stepcache.bench.methods import build_policy, method_unavailable, parse_spec
from stepcache.bench.figures import pareto_plot
from stepcache.bench.records import append_record, config_key, markdown_table, read_records
from stepcache.bench.runner import RunSettings, interleaved, make_config, make_inputs, make_record, quality
from stepcache.errors import ConfigError

DEFAULT_SPECS = ("fora:interval=2", "fora:interval=3", "fora:interval=4", "fora:interval=5",
                 "toca:interval=3,fresh_ratio=0.1", "toca:interval=4,fresh_ratio=0.1",
                 "toca:interval=5,fresh_ratio=0.1", "l2c:threshold=0.1", "l2c:threshold=0.3")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    model_id: dict          # identity for the record key
    embedded: bool          # digits model: the judge applies


def load_model(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """``"embedded"`` (default) or a native DiT checkpoint path / official name, on ``device`` in ``dtype``.

    The record key names the device and dtype when they are not the CPU and float32 (so records made
    before these options existed keep their keys)."""
    from stepcache.models.dit import config_dict

    if name == "embedded":
        from stepcache.models.embedded import WEIGHTS_FILE, load_embedded

        model, model_id, embedded = load_embedded(), {"name": "embedded", "bytes": WEIGHTS_FILE.stat().st_size}, True
    else:
        from stepcache.models.dit import DiT

        model = DiT.from_pretrained(name).eval()
        model_id, embedded = {"name": str(name), **config_dict(model)}, False
    device = torch.device(device)
    if device.type != "cpu":
        model_id["device"] = device.type
    if dtype != torch.float32:
        model_id["dtype"] = str(dtype).removeprefix("torch.")
    return LoadedModel(model.to(device=device, dtype=dtype), model_id, embedded)


def runnable_specs(specs, settings: RunSettings, embedded: bool, log=print) -> list[str]:
    """The specs whose method can run here; the others are reported with the reason and skipped."""
    out = []
    for spec in specs:
        reason = method_unavailable(parse_spec(spec)[0], settings.num_steps, settings.sampler, embedded)
        if reason:
            log(f"skipping {spec}: {reason}")
        else:
            out.append(spec)
    return out


def sweep(loaded: LoadedModel, specs, settings: RunSettings, out_jsonl: Path, log=print,
          progress: bool = False, force: bool = False) -> list[dict]:
    """Measure the baseline and every runnable spec not yet in ``out_jsonl`` (all of them when ``force``), in
    interleaved rounds; returns this sweep's records (old and new)."""
    settings.validate()
    if not specs:
        raise ConfigError("There are no policies to benchmark.")
    existing = {} if force else {r["key"]: r for r in read_records(out_jsonl)}
    noise, labels = make_inputs(loaded.model, settings.num_samples, settings.seed)
    policies = [build_policy(s, settings.num_steps, settings.sampler, loaded.embedded)
                for s in runnable_specs(specs, settings, loaded.embedded, log)]
    base_policy = build_policy("none", settings.num_steps, settings.sampler)
    configs = [make_config(loaded.model_id, settings, p) for p in [base_policy] + policies]
    todo = [config_key(c) not in existing for c in configs]
    records = [existing.get(config_key(c)) for c in configs]
    if not any(todo):
        log("every config is already in the results file; nothing to measure (--force re-measures)")
        return records
    log(f"baseline: {settings.sampler}-{settings.num_steps}, {settings.num_samples} samples, cfg {settings.cfg_scale}; "
        f"{settings.repeats} interleaved rounds")
    measured = [0] + [k for k in range(1, len(configs)) if todo[k]]
    runs = interleaved(loaded.model, noise, labels, settings, [([base_policy] + policies)[k] for k in measured],
                       progress)
    (ref, stats, base_times), new = runs[0], dict(zip(measured[1:], runs[1:]))
    base = make_record(configs[0], base_policy, base_times, stats, None, quality(ref, labels, None, loaded.embedded))
    if todo[0]:
        append_record(out_jsonl, base, replace=force)
        records[0] = base
    for k, policy in enumerate(policies, start=1):
        if not todo[k]:
            log(f"{records[k]['label']}: already measured")
            continue
        images, stats, times = new[k]
        rec = make_record(configs[k], policy, times, stats, base_times, quality(images, labels, ref, loaded.embedded))
        append_record(out_jsonl, rec, replace=force)
        records[k] = rec
        log(f"{rec['label']}: {rec['time']['median_s']:.2f} s, {rec['time']['speedup']:.2f}x")
    return records


def write_reports(records: list[dict], out_dir: Path, stem: str = "bench", title: str = "") -> dict:
    """``<stem>.md`` (markdown table) and ``<stem>_pareto.png`` (speedup vs SSIM) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    md.write_text(markdown_table(records))
    png = pareto_plot(records, out_dir / f"{stem}_pareto.png", "ssim", title)
    return {"table": md, "plot": png}
