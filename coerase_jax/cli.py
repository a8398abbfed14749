"""The ``coerase`` command.

    coerase sample --config configs/tiny.py --prompt "a red circle" --out DIR [--config.sample.steps=50]

Any ``--config.a.b=value`` argument overrides the config file; bad input (a missing folder, an
unknown key, a refused pickle file) ends with one ``coerase: error: ...`` line and status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from coerase_jax.errors import UserError

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "toyworld.py")


def cmd_sample(args, config) -> None:
    from PIL import Image

    from coerase_jax.diffusion.pipeline import Sampler, image_grid
    from coerase_jax.models.bundle import load_bundle_from_config
    from coerase_jax.parallel import distributed

    s = config.sample
    prompts = list(args.prompt or s.prompts)
    if not prompts:
        raise UserError("no prompts: pass --prompt or set sample.prompts")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bundle = load_bundle_from_config(config.model)
    print(f"loaded {bundle.source} in {time.perf_counter() - start:.1f}s")
    jobs = [(p, s.seed + i * len(prompts) + j) for i in range(s.num_images_per_prompt) for j, p in enumerate(prompts)]
    sampler = Sampler(bundle, s.steps, s.guidance_scale, s.batch_size)
    start = time.perf_counter()
    images = sampler([p for p, _ in jobs], [seed for _, seed in jobs], negative_prompt=s.negative_prompt)
    elapsed = time.perf_counter() - start
    if not distributed.is_leader():
        return
    manifest = []
    for i, ((prompt, seed), image) in enumerate(zip(jobs, images)):
        name = f"{i:05d}.png"
        Image.fromarray(image).save(out / name)
        manifest.append({"file": name, "prompt": prompt, "seed": seed})
    Image.fromarray(image_grid(images, columns=len(prompts))).save(out / "grid.png")
    (out / "manifest.json").write_text(json.dumps({"config": config.to_dict(), "images": manifest}, indent=2,
                                                  default=str))
    print(f"wrote {len(images)} images and grid.png to {out} ({len(images) / elapsed:.2f} images/s "
          f"including compilation)")


def _check_report_kind(config) -> None:
    if config.report.kind not in ("", "toyworld"):
        raise UserError(f"report.kind must be '' or 'toyworld', got {config.report.kind!r}")


def cmd_erase(args, config) -> None:
    from coerase_jax.erase.trainer import run_erasure
    from coerase_jax.models.bundle import load_bundle_from_config

    _check_report_kind(config)
    if args.run_dir or args.out:
        with config.unlocked():
            config.run_dir = args.run_dir or str(Path(args.out) / "run")
    start = time.perf_counter()
    bundle = load_bundle_from_config(config.model)
    run_erasure(config, bundle)
    print(f"finished: {config.run_dir} (export with: coerase export --run {config.run_dir} --out DIR)")
    if config.report.kind == "toyworld":
        report_toyworld(config, bundle, Path(args.out or config.run_dir))
    print(f"total {time.perf_counter() - start:.0f}s")


def cmd_sweep(args, config) -> None:
    from coerase_jax.erase.sweep import run_sweep
    from coerase_jax.models.bundle import load_bundle_from_config

    _check_report_kind(config)
    out = Path(args.out)
    start = time.perf_counter()
    bundle = load_bundle_from_config(config.model)
    judge = None
    if config.report.kind == "toyworld" and config.sweep.report:
        judge = lambda cfg, run_dir: report_toyworld(cfg, bundle, run_dir)
    rows = run_sweep(config, bundle, out, report=judge)
    print((out / "sweep.md").read_text() if (out / "sweep.md").is_file() else "")
    print(f"{len(rows)} cells; wrote {out / 'sweep.csv'} and {out / 'sweep.md'} in {time.perf_counter() - start:.0f}s")


def cmd_frontier(args, config) -> None:
    from coerase_jax.evaluate.frontier import format_joint_markdown, format_markdown, run_frontier
    from coerase_jax.models.bundle import load_bundle_from_config
    from coerase_jax.parallel import distributed
    from coerase_jax.parallel.mesh import make_mesh

    start = time.perf_counter()
    bundle = load_bundle_from_config(config.model)
    frontier = run_frontier(config, bundle, Path(args.out), mesh=make_mesh(dict(config.mesh)))
    if distributed.is_leader():
        joint = bool(config.concept.joint)
        print((format_joint_markdown if joint else format_markdown)(frontier))
        print(f"wrote {args.out}/frontier.json, frontier.md{'' if joint else ' and frontier.png'} "
              f"in {time.perf_counter() - start:.0f}s")


def report_toyworld(config, bundle, out: Path) -> None:
    """Original vs text stage only (the ESD baseline) vs Co-Erasing, judged by the world's classifier."""
    from coerase_jax.erase.trainer import stage_models
    from coerase_jax.toyworld import report

    models = {"original": bundle.unet_params, **stage_models(config, bundle)}
    if config.concept.joint:
        result = report.compare_joint(bundle, models, [name for name, _ in config.concept.joint], config.report, out,
                                      preserved=tuple(config.concept.preserve))
        print(report.format_joint_table(result))
        print(f"wrote {out / 'report.json'}")
        return
    result = report.compare(bundle, models, config.concept.name, config.report, out,
                            preserved=tuple(config.concept.preserve))
    print(report.format_table(result))
    print(f"wrote {out / 'report.json'} and {out / 'grid.png'}")


def cmd_eval(args, config) -> None:
    from coerase_jax.configuration import config_from_run
    from coerase_jax.erase.trainer import plan_stages, run_erasure, stage_done, stage_models
    from coerase_jax.evaluate.suite import evaluate_models, evaluation_rows, format_markdown
    from coerase_jax.models.bundle import load_bundle_from_config
    from coerase_jax.parallel import distributed
    from coerase_jax.parallel.mesh import make_mesh

    start = time.perf_counter()
    bundle = load_bundle_from_config(config.model)
    evaluation_rows(config, bundle)  # a bad prompt file fails now, not after an erasure
    models = {"original": bundle.unet_params}
    if args.run:
        for run in args.run:
            run_config = config_from_run(run)
            if run_config.model.source != config.model.source:
                raise UserError(f"{run} erased {run_config.model.source!r}, not {config.model.source!r} "
                                f"(pass the run's own --config)")
            if not all(stage_done(s, Path(run)) for s in plan_stages(run_config)):
                raise UserError(f"{run} is not finished (resume it with coerase erase --run-dir {run})")
            for name, params in stage_models(run_config, bundle).items():
                models[f"{Path(run).name}/{name}" if len(args.run) > 1 else name] = params
    else:  # the config's own run: erased first if it is not there yet (it resumes if it was cut short)
        if not all(stage_done(s, Path(config.run_dir)) for s in plan_stages(config)):
            print(f"no finished erasure in {config.run_dir}: running it first")
            run_erasure(config, bundle)
        models.update(stage_models(config_from_run(config.run_dir), bundle))  # as the run was made
    out = Path(args.out)
    report = evaluate_models(config, bundle, models, out, mesh=make_mesh(dict(config.mesh)))
    if not distributed.is_leader():
        return
    print(format_markdown(report))
    print(f"wrote {out}/report.json, report.md, efficacy_usability.png and per_group.png "
          f"in {time.perf_counter() - start:.0f}s")


def cmd_refs(args, config) -> None:
    from coerase_jax.data.references import generate_references
    from coerase_jax.models.bundle import load_bundle_from_config

    d = config.data
    out = Path(args.out or (Path(config.run_dir) / "references"))
    from coerase_jax.parallel.mesh import make_mesh

    bundle = load_bundle_from_config(config.model)
    prompts = list(config.concept.reference_prompts) or list(config.concept.prompts)
    generate_references(bundle, out, prompts, d.num_references, d.reference_seed, d.reference_steps,
                        d.reference_guidance, d.reference_batch_size, mesh=make_mesh(dict(config.mesh)))
    print(f"wrote {d.num_references} reference images and manifest.json to {out}")


def cmd_export(args, config) -> None:
    from coerase_jax.configuration import config_from_run
    from coerase_jax.erase.lora import export_lora
    from coerase_jax.erase.trainer import final_lora, final_params
    from coerase_jax.models.bundle import load_bundle_from_config
    from coerase_jax.models.export import export_unet, export_unet_flax
    from coerase_jax.parallel import distributed

    config = config_from_run(args.run)
    bundle = load_bundle_from_config(config.model)
    params = final_params(config, bundle)
    if not distributed.is_leader():
        return
    out = Path(args.out) / "unet"
    export_unet(params, bundle.unet_config, out)
    export_unet_flax(params, bundle.unet_config, out)
    print(f"wrote {out}/diffusion_pytorch_model.safetensors (diffusers PyTorch layout), "
          f"diffusion_flax_model.msgpack (Flax layout) and config.json")
    if config.erase.lora_rank:
        path = export_lora(final_lora(config, bundle), 1.0, args.out)
        print(f"wrote {path} (diffusers LoRA, PEFT layout: pipeline.load_lora_weights(\"{args.out}\"))")


def cmd_bench(args, config) -> None:
    from coerase_jax.benchmark import format_table, run_bench

    result = run_bench(config, compile_only=args.compile_only)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


def cmd_toyworld(args, config) -> None:
    from coerase_jax.toyworld.train import TrainPlan, build_world_model

    if args.action == "check":
        from coerase_jax.models.bundle import load_bundle
        from coerase_jax.toyworld.report import format_quality, world_quality

        quality = world_quality(load_bundle(args.model), config.report, args.images_per_shape)
        print(format_quality(quality))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "quality.json").write_text(json.dumps(quality, indent=2))
        return
    if not args.out:
        raise UserError("coerase toyworld train needs --out DIR")
    plan = (TrainPlan.quick() if args.quick else TrainPlan(seed=args.seed)).with_overrides(args.plan or [])
    start = time.perf_counter()
    out = build_world_model(args.out, plan)
    print(f"wrote the small world's SD stack to {out} in {time.perf_counter() - start:.0f}s")


COMMANDS = {"sample": cmd_sample, "erase": cmd_erase, "eval": cmd_eval, "sweep": cmd_sweep, "refs": cmd_refs,
            "export": cmd_export, "frontier": cmd_frontier,
            "bench": cmd_bench, "toyworld": cmd_toyworld}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coerase", description="Co-Erasing concept erasure for SD 1.x in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="generate images with DDIM + classifier-free guidance")
    sample.add_argument("--config", default=DEFAULT_CONFIG,
                        help="config file (default: configs/toyworld.py, the small world)")
    sample.add_argument("--prompt", action="append", help="a prompt (repeatable); overrides sample.prompts")
    sample.add_argument("--out", required=True, help="output folder for PNGs, grid.png and manifest.json")
    erase = sub.add_parser("erase", help="erase a concept (text stage, then the Co-Erasing image stage)")
    erase.add_argument("--config", default=DEFAULT_CONFIG)
    erase.add_argument("--run-dir", help="run directory (overrides run_dir); an existing one resumes")
    erase.add_argument("--out", help="output folder: the run (OUT/run) and, for the small world, report.json "
                                     "and grid.png")
    evaluate = sub.add_parser("eval", help="efficacy, robustness to attack and usability of erased models vs the "
                                           "original (report.json, report.md, plots)")
    evaluate.add_argument("--config", default=DEFAULT_CONFIG,
                          help="config (default: the small world; its run is erased first if missing)")
    evaluate.add_argument("--run", action="append", help="a finished run directory (repeatable; default: run_dir)")
    evaluate.add_argument("--out", required=True, help="output folder: images/, report.json, report.md, *.png")
    sweep = sub.add_parser("sweep", help="a grid of erasures (sweep.concepts x sweep.grid), resumable, one table")
    sweep.add_argument("--config", required=True, help="a sweep config, e.g. configs/sweep_toyworld.py")
    sweep.add_argument("--out", required=True, help="sweep folder: cells/<cell>/ runs, sweep.csv, sweep.md")
    frontier = sub.add_parser("frontier", help="erasure recipes at equal budget, each over a grid of its knobs, "
                                               "judged together: efficacy vs usability (frontier.json/md/png)")
    frontier.add_argument("--config", required=True, help="a frontier config, e.g. configs/frontier_toyworld.py")
    frontier.add_argument("--out", required=True, help="folder: points/<point>/ runs, eval/, frontier.*")
    refs = sub.add_parser("refs", help="generate reference images of the concept with the original model")
    refs.add_argument("--config", default=DEFAULT_CONFIG)
    refs.add_argument("--out", help="output folder (default: run_dir/references)")
    export = sub.add_parser("export", help="write a run's erased UNet (diffusers PyTorch and Flax layouts)")
    export.add_argument("--run", required=True, help="a finished run directory")
    export.add_argument("--out", required=True)
    export.add_argument("--config", default=DEFAULT_CONFIG, help=argparse.SUPPRESS)
    bench = sub.add_parser("bench", help="compile and time the erasure step and the sampler")
    bench.add_argument("--config", default=DEFAULT_CONFIG)
    bench.add_argument("--json", help="write the results (fixed schema, see coerase_jax/benchmark.py) here")
    bench.add_argument("--compile-only", action="store_true", help="compile and analyse, do not run")
    bench.add_argument("--simulate-devices", type=int, default=0,
                       help="on CPU: pretend to have N devices (for mesh / FSDP memory checks)")
    toyworld = sub.add_parser("toyworld", help="the small world: `coerase toyworld train --out DIR`, "
                                               "`coerase toyworld check --model DIR`")
    toyworld.add_argument("action", choices=["train", "check"],
                          help="train: the whole stack from scratch (~35 min, 2 cores); check: does a built world "
                               "draw every shape in the asked colour, is its judge right (report.split's seeds)")
    toyworld.add_argument("--out", help="train: output folder (diffusers layout), resumes finished parts; "
                                        "check: where quality.json goes (optional)")
    toyworld.add_argument("--model", default="toyworld", help="check: a world folder or preset")
    toyworld.add_argument("--images-per-shape", type=int, default=256, help="check: images of each shape")
    toyworld.add_argument("--seed", type=int, default=0)
    toyworld.add_argument("--quick", action="store_true", help="a few steps of each part, to check the chain")
    toyworld.add_argument("--plan", action="append", metavar="FIELD=VALUE",
                          help="change a TrainPlan field (repeatable), e.g. --plan clip_token_identity=false")
    toyworld.add_argument("--config", default=DEFAULT_CONFIG, help=argparse.SUPPRESS)
    return parser


def _simulate_devices(argv: list[str]) -> None:
    """``--simulate-devices N`` must reach XLA before jax initialises its CPU backend."""
    import os

    for i, arg in enumerate(argv):
        count = arg.split("=", 1)[1] if arg.startswith("--simulate-devices=") else (
            argv[i + 1] if arg == "--simulate-devices" and i + 1 < len(argv) else None)
        if count and int(count) > 0:
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(count)}".strip()


def main(argv: list[str] | None = None) -> int:
    from coerase_jax.configuration import OVERRIDE_PREFIX, load_config
    from coerase_jax.erase.trainer import Preempted

    argv = sys.argv[1:] if argv is None else argv
    _simulate_devices(argv)
    overrides = [a for a in argv if a.startswith(OVERRIDE_PREFIX)]
    parser = build_parser()
    args = parser.parse_args([a for a in argv if not a.startswith(OVERRIDE_PREFIX)])
    from coerase_jax.models import quiet_library_warnings

    quiet_library_warnings()
    try:
        config = load_config(args.config, overrides)
        from coerase_jax.parallel import distributed

        setup = distributed.initialize()  # before anything touches a device; a no-op on one host
        if setup != "single":
            import jax

            print(f"coerase: process {jax.process_index()} of {jax.process_count()} ({setup}), "
                  f"{jax.local_device_count()} of {jax.device_count()} devices here", flush=True)
        from coerase_jax import compile_cache

        cache = compile_cache.enable(config.compile.cache_dir, config.compile.executables)
        counter = compile_cache.counter()
        compiled_before, loaded_before = counter.counts()
        COMMANDS[args.command](args, config)
        compiled, loaded = (now - before for now, before in zip(counter.counts(), (compiled_before, loaded_before)))
        if distributed.is_leader():
            where = f"the compilation cache in {cache}" if cache else "no compilation cache (compile.cache_dir=off)"
            print(f"coerase: {compiled} programs compiled, {loaded} loaded from {where}")
    except UserError as err:
        print(f"coerase: error: {err}", file=sys.stderr)
        return 2
    except Preempted as note:
        print(f"coerase: {note}", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
