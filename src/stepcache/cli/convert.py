"""``stepcache convert``: DiT weights between the native model and diffusers' ``DiTTransformer2DModel``.

    stepcache convert --to diffusers --from DiT-XL-2-256x256.pt --out dit-xl-diffusers/
    stepcache convert --to native --from facebook-DiT-folder/ --out dit.safetensors

``--to diffusers`` reads a native checkpoint (a file, an official name or ``embedded``) and writes a
``save_pretrained`` folder. diffusers rebuilds the timestep embedders with ``downscale_freq_shift=1``
when it loads that folder (the shift is no config field), so to get the native outputs back call
``stepcache.models.convert.set_frequency_shift(model, 0)`` after loading. ``--to native`` reads a
transformer folder or a whole pipeline folder (its ``transformer/``) and writes a native checkpoint
(.safetensors with its config, or .pt), the network as DiT's authors run it.
"""

from __future__ import annotations

from pathlib import Path

from stepcache.errors import CheckpointError, ConfigError, MissingDependencyError


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert DiT weights between stepcache's native DiT and diffusers",
                       description=__doc__.splitlines()[0])
    p.add_argument("--to", required=True, choices=("diffusers", "native"), help="the format to write")
    p.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                   help="--to diffusers: a native checkpoint file, an official name or 'embedded'; "
                        "--to native: a DiTTransformer2DModel folder or a DiTPipeline folder")
    p.add_argument("--out", type=Path, required=True,
                   help="--to diffusers: a folder; --to native: a .safetensors or .pt file")
    p.set_defaults(func=run)


def _need_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise MissingDependencyError("convert needs diffusers (pip install 'stepcache[diffusers]').") from None


def to_diffusers(source: str, out: Path) -> Path:
    from stepcache.models.convert import dit_to_diffusers
    from stepcache.models.dit import DiT

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; --to diffusers writes a folder.")
    if source == "embedded":
        from stepcache.models.embedded import load_embedded

        model = load_embedded()
    else:
        model = DiT.from_pretrained(source)
    dit_to_diffusers(model.float().cpu()).save_pretrained(str(out))
    return out


def _transformer_folder(source: str) -> Path:
    path = Path(source)
    if not path.is_dir():
        raise CheckpointError(f"--from {source} is not a folder (a DiTTransformer2DModel or DiTPipeline folder).")
    if (path / "model_index.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} holds no diffusers model (no config.json).")
    return path


def to_native(source: str, out: Path) -> tuple[Path, str]:
    """(path written, a note on what the native model runs differently, or "")."""
    from diffusers import DiTTransformer2DModel

    from stepcache.models.checkpoints import save_dit
    from stepcache.models.convert import NATIVE_EPS, diffusers_to_dit, frequency_shifts

    if out.suffix not in (".safetensors", ".pt"):
        raise ConfigError(f"--out {out} must end in .safetensors or .pt.")
    folder = _transformer_folder(source)
    try:
        transformer = DiTTransformer2DModel.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder} is not a DiTTransformer2DModel ({str(exc).splitlines()[0]}).") from None
    # exact=False: a loaded folder always has diffusers' frequency shift 1; the native model uses DiT's 0
    model = diffusers_to_dit(transformer, exact=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_dit(model, out)
    shifts, eps = frequency_shifts(transformer), float(transformer.config.norm_eps)
    note = ""
    if any(s != 0 for s in shifts) or eps != NATIVE_EPS:
        note = (f"diffusers ran this model with timestep frequency shift {max(shifts, key=abs):g} and norm_eps "
                f"{eps:g}; the native DiT uses DiT's 0 and 1e-6, so outputs differ slightly from the diffusers run.")
    return out, note


def run(args) -> int:
    _need_diffusers()
    if args.to == "diffusers":
        out = to_diffusers(args.source, args.out)
        print(f"Wrote {out} (DiTTransformer2DModel). After DiTTransformer2DModel.from_pretrained, call "
              "stepcache.models.convert.set_frequency_shift(model, 0) to compute what the native DiT computes.")
        return 0
    out, note = to_native(args.source, args.out)
    print(f"Wrote {out} (native DiT)." + (f" Note: {note}" if note else ""))
    return 0
