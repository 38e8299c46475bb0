"""`xlsr-jax` command line: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback

from data_pipelines.errors import UserError
from data_pipelines.ingest.layouts import LAYOUTS
from xlsr_jax.config import HEADS, PRESETS, ConfigError
from xlsr_jax.host_memory import reexec_with_huge_pages


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.direction == "hf-to-jax":
        from xlsr_jax.convert.hf import hf_to_jax

        out = hf_to_jax(args.input, args.output, head=args.head, trust_pickle=args.trust_pickle)
    elif args.direction == "jax-to-hf":
        from xlsr_jax.convert.hf import jax_to_hf

        out = jax_to_hf(args.input, args.output, legacy_weight_norm=args.legacy_weight_norm)
    else:
        from xlsr_jax.convert.fairseq import fairseq_to_jax

        out = fairseq_to_jax(args.input, args.output, dict_path=args.dict, trust_pickle=args.trust_pickle)
    print(f"wrote {out}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from xlsr_jax.embed import embed_files

    report = embed_files(args.model, args.audio, args.output, layer=args.layer, batch_size=args.batch_size,
                         dtype=args.dtype)
    for path, shape in zip(report.outputs, report.shapes):
        print(f"{path}\t{shape[0]}x{shape[1]}")
    print(f"embedded {len(report.outputs)} file(s), {report.audio_seconds:.1f} s of audio in "
          f"{report.wall_seconds:.2f} s ({report.realtime_factor:.1f}x real time, compile included)")
    return 0


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from xlsr_jax.inference import Predictor, predict_files

    given = {"chunk_seconds": args.chunk_seconds, "overlap_seconds": args.overlap_seconds,
             "batch_size": args.batch_size}
    given = {k: v for k, v in given.items() if v is not None}
    predictor = Predictor.load(args.model, dtype=args.dtype, **given)
    failed = []
    for result in predict_files(predictor, args.audio, progress=not args.quiet):
        # tqdm.write keeps these lines clear of the progress bar on stderr.
        if result.error is not None:
            failed.append(str(result.path))
            tqdm.write(f"xlsr-jax transcribe: error: {result.error}", file=sys.stderr)
        elif result.text is not None:
            tqdm.write(f"{result.path}\t{result.text}", file=sys.stdout)
        else:
            tqdm.write(f"{result.path}\t{result.label}\t{result.probability:.4f}", file=sys.stdout)
    if failed:
        print(f"xlsr-jax transcribe: {len(failed)} of {len(args.audio)} file(s) failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from xlsr_jax.evaluate import default_output, evaluate_model_dir, format_report

    given = {"batch_size": args.batch_size, "num_buckets": args.num_buckets}
    given = {k: v for k, v in given.items() if v is not None}
    lowercase = {"auto": None, "yes": True, "no": False}[args.lowercase]
    report = evaluate_model_dir(args.model, args.data, split=args.split, max_batches=args.max_batches,
                                dtype=args.dtype, lowercase=lowercase, progress=not args.quiet, **given)
    for line in format_report(report):
        print(line)
    out = report.write(args.output or default_output(args.model, args.data, args.split))
    print(f"wrote {out}")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from xlsr_jax.config import get_preset
    from xlsr_jax.model_dir import save_model_dir
    from xlsr_jax.models.heads import count_params, init_params

    config = get_preset(args.preset)
    params = init_params(config, args.head, seed=args.seed)
    out = save_model_dir(args.output, config, params, args.head)
    print(f"wrote {out}: random {args.preset} {args.head} model, {count_params(params):,} parameters")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from xlsr_jax.models.heads import abstract_params, count_params

    print(f"{'preset':<12}{'layers':>7}{'hidden':>8}{'ffn':>7}{'heads':>7}{'params (encoder)':>19}"
          f"{'params (pretraining)':>23}")
    for name, cfg in PRESETS.items():
        enc = count_params(abstract_params(cfg, "base"))
        pre = count_params(abstract_params(cfg, "pretraining"))
        print(f"{name:<12}{cfg.num_hidden_layers:>7}{cfg.hidden_size:>8}{cfg.intermediate_size:>7}"
              f"{cfg.num_attention_heads:>7}{enc:>19,}{pre:>23,}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("libtpu") is not None:  # the fit stage compiles for a TPU slice
        from xlsr_jax.parallel.topology import quiet_libtpu

        quiet_libtpu()  # before the TPU plugin loads
    import jax

    from xlsr_jax.demo import Demo
    from xlsr_jax.demo_report import headline

    if args.devices:
        jax.config.update("jax_num_cpu_devices", args.devices)  # before the first device is touched
    logging.getLogger("xlsr_jax").setLevel(logging.INFO)  # the loop's job and resume lines
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on metrics and metadata
    demo = Demo(args.workdir, args.minutes, on_stage=lambda s: print(f"== {s.name} ({s.seconds:.0f} s): {headline(s)}",
                                                                      flush=True))
    plan = demo.plan
    print(f"xlsr-jax demo in {demo.workdir}: budget {plan.minutes:g} min -> {plan.pretrain_steps} pretraining, "
          f"{plan.ctc_steps} CTC and {plan.lid_steps} language-ID steps", flush=True)
    result = demo.run()
    print(f"done in {result.seconds:.0f} s; report: {result.report}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from data_pipelines.ingest.prepare import prepare, summarize

    t0 = time.perf_counter()
    settings = dict(layout=args.layout, num_shards=args.num_shards, records_per_shard=args.records_per_shard,
                    codec=args.codec, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                    split_long=args.split_long, split=args.split, language=args.language,
                    language_from_parent=args.language_from_parent, strict=args.strict)
    if args.runner:
        from data_pipelines.ingest.beam import prepare_beam

        if args.workers is not None:
            raise UserError("--workers is for the local path; with --runner, give the runner's own option, "
                            "e.g. --beam-option=--direct_num_workers=4")
        logging.getLogger("data_pipelines").setLevel(logging.INFO)
        index, counters = prepare_beam(args.inputs, args.output, runner=args.runner, beam_options=args.beam_option,
                                       **settings)
        print(counters.summary() if counters else "beam: every shard was already written; nothing to run")
    else:
        if args.beam_option:
            raise UserError("--beam-option needs --runner")
        index = prepare(args.inputs, args.output, workers=args.workers, progress=not args.quiet, **settings)
    print(f"{summarize(index)} -> {args.output} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _start_distributed(args: argparse.Namespace) -> None:
    """Join the multi-host job the flags or the environment describe (before anything touches a device)."""
    from xlsr_jax.parallel import distributed

    spec = distributed.detect(args.coordinator_address, args.num_processes, args.process_id)
    distributed.initialize(spec, heartbeat_timeout_s=args.heartbeat_timeout)


def _cmd_train(args: argparse.Namespace) -> int:
    from xlsr_jax.experiment import load_experiment
    from xlsr_jax.train.loop import train_and_evaluate

    config = load_experiment(args.config, args.overrides)  # config errors before joining a job
    _start_distributed(args)
    logging.getLogger("xlsr_jax").setLevel(logging.INFO)  # the loop's start-up and job lines
    result = train_and_evaluate(config, args.workdir)
    state = "preempted: saved and stopped" if result.preempted else "done"
    print(f"{state} at step {result.step}; checkpoints and metrics.jsonl in {args.workdir}")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    import json

    from xlsr_jax.parallel.topology import parse_topology, quiet_libtpu

    if (args.topology is None) == (args.devices is None):
        raise ConfigError("give exactly one of --topology (a TPU pod, e.g. v5e-256) or --devices N (fake CPU devices)")
    topology = parse_topology(args.topology, args.num_slices) if args.topology else None
    if topology is not None:
        quiet_libtpu()  # before the TPU plugin loads
    import jax

    from xlsr_jax.experiment import load_experiment
    from xlsr_jax.train.fit import fit, format_report, largest_fitting

    config = load_experiment(args.config, args.overrides)
    devices = None
    if args.devices is not None:
        jax.config.update("jax_num_cpu_devices", args.devices)
        devices = jax.devices("cpu")
    target = topology.describe() if topology else f"{args.devices} CPU devices"
    print(f"compiling {args.config} for {target} (abstract state: nothing is allocated) ...", flush=True)
    program, report = fit(config, topology=topology, devices=devices, num_samples=args.num_samples,
                          dump_dir=args.dump_hlo)
    for line in format_report(report):
        print(line)
    summary = report.summary()
    if args.search != "none" and topology is not None:
        print(f"searching the largest {args.search} that fits (up to {args.max_probes} compiles) ...", flush=True)
        best, probes = largest_fitting(program, report, args.search, args.max_probes, progress=print)
        name = "global batch" if args.search == "batch" else "crop (samples)"
        print(f"largest {name} that fits: {best}" + (f" ({best / 16000:.1f} s)" if args.search == "crop" else "")
              + f" after {probes} compiles" + ("" if best else ": nothing fits, shard more or remat more"))
        summary[f"largest_{args.search}"] = best
    print(json.dumps(summary))
    return 0 if report.fits or not args.fail_if_not_fit else 1


def _cmd_launch(args: argparse.Namespace) -> int:
    from xlsr_jax import launch
    from xlsr_jax.experiment import load_experiment

    required = {"tpu": ("accelerator_type", "zone"), "xpk": ("accelerator_type", "cluster"), "slurm": ("nodes",)}
    missing = [f"--{n.replace('_', '-')}" for n in required[args.target] if getattr(args, n) is None]
    if missing:
        raise ConfigError(f"launch {args.target} needs {', '.join(missing)}")
    experiment = load_experiment(args.config, args.overrides)  # a bad config fails here, before anything is created
    if args.target == "tpu":
        target = launch.check_tpu_mesh(experiment, args.accelerator_type, args.num_slices)
        plan = launch.tpu_plan(args.name, args.zone, args.accelerator_type, args.config, args.workdir, args.overrides,
                               num_slices=args.num_slices, runtime_version=args.runtime_version, project=args.project,
                               package=args.package, spot=args.spot)
    elif args.target == "xpk":
        target = launch.check_tpu_mesh(experiment, args.accelerator_type, args.num_slices)
        plan = launch.xpk_plan(args.cluster, args.name, args.accelerator_type, args.config, args.workdir,
                               args.overrides, num_slices=args.num_slices, base_image=args.base_image,
                               project=args.project, zone=args.zone, package=args.package)
    else:
        target = launch.check_gpu_mesh(experiment, args.nodes, args.gpus_per_node)
        plan = launch.slurm_plan(args.name, args.nodes, args.gpus_per_node, args.config, args.workdir, args.overrides,
                                 partition=args.partition, time_limit=args.time, setup=args.setup)
    print(f"# {args.target}: {target}; mesh checked")
    print(plan.render())
    if args.dry_run:
        return 0
    return launch.run_plan(plan)


def _cmd_export(args: argparse.Namespace) -> int:
    from xlsr_jax.train.export import export_checkpoint

    _start_distributed(args)
    out = export_checkpoint(args.workdir, args.output, step=args.step)
    print(f"wrote {out}")
    return 0


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    from xlsr_jax.parallel.distributed import DEFAULT_HEARTBEAT_TIMEOUT_S

    group = parser.add_argument_group(
        "multi-host", "the same command on every host; detected on Cloud TPU VMs and under SLURM, or given here "
                      "(or as JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    group.add_argument("--coordinator-address", help="HOST:PORT of process 0")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    group.add_argument("--heartbeat-timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT_S,
                       help="seconds without a peer's heartbeat before every process exits (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlsr-jax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an input error")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="convert checkpoints between Hugging Face, fairseq and xlsr-jax")
    conv.add_argument("direction", choices=["hf-to-jax", "jax-to-hf", "fairseq-to-jax"])
    conv.add_argument("--input", required=True,
                      help="hf-to-jax: HF directory or Hub id ORG/NAME[@REVISION] (from the local HF cache, "
                           "downloaded unless HF_HUB_OFFLINE=1); jax-to-hf: xlsr-jax model directory; "
                           "fairseq-to-jax: fairseq .pt")
    conv.add_argument("--output", required=True, help="output directory (must be new or empty)")
    conv.add_argument("--head", choices=HEADS, help="hf-to-jax: override the head read from config.json")
    conv.add_argument("--legacy-weight-norm", action="store_true",
                      help="jax-to-hf: write weight_g/weight_v instead of parametrizations.weight.original0/1")
    conv.add_argument("--dict", help="fairseq-to-jax: dict.ltr.txt for CTC checkpoints without a stored dictionary")
    conv.add_argument("--trust-pickle", action="store_true",
                      help="fairseq-to-jax, and hf-to-jax of a legacy pytorch_model.bin: allow arbitrary pickled "
                           "objects, which can run code stored in the file (only for files you trust)")
    conv.set_defaults(func=_cmd_convert)

    emb = sub.add_parser("embed", help="write one [frames, hidden] .npy per audio file")
    emb.add_argument("audio", nargs="+", help="audio files (wav/flac/ogg/mp3, any rate, any channels)")
    emb.add_argument("--model", required=True, help="xlsr-jax model directory")
    emb.add_argument("--output", required=True, help="directory for the .npy files")
    emb.add_argument("--layer", type=int, default=None,
                     help="hidden_states index as in Hugging Face (default: the last hidden state)")
    emb.add_argument("--batch-size", type=int, default=8)
    emb.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype override")
    emb.set_defaults(func=_cmd_embed)

    tr = sub.add_parser("transcribe", help="print PATH<TAB>TEXT (CTC model) or PATH<TAB>LABEL<TAB>PROBABILITY "
                                           "(classification model) per audio file, any length",
                        description="Long files run as overlapping windows whose kept frames are stitched "
                                    "together. Exit status 1 when some files could not be read (the others "
                                    "are still printed), 2 when nothing could run.")
    tr.add_argument("audio", nargs="+", help="audio files (wav/flac/ogg/mp3, any rate, any channels)")
    tr.add_argument("--model", required=True, help="xlsr-jax model directory (ctc or sequence_classification head)")
    # Defaults live in xlsr_jax.inference; importing it here would load JAX for every command.
    tr.add_argument("--chunk-seconds", type=float,
                    help="window length for long files (default: inference.DEFAULT_CHUNK_SECONDS)")
    tr.add_argument("--overlap-seconds", type=float,
                    help="context on each side of a window that is run but not kept "
                         "(default: inference.DEFAULT_OVERLAP_SECONDS)")
    tr.add_argument("--batch-size", type=int,
                    help="windows per forward pass (default: inference.DEFAULT_BATCH_SIZE)")
    tr.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype override")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_transcribe)

    ev = sub.add_parser("evaluate", help="score a CTC (WER, CER) or language-ID (accuracy, confusion) model "
                                         "directory on a split of a prepared data set",
                        description="Runs the training loop's evaluation over every record of the split, batch "
                                    "rows split over this machine's devices; prints overall and per-language "
                                    "metrics and writes them as JSON.")
    ev.add_argument("--model", required=True, help="xlsr-jax model directory (ctc or sequence_classification head)")
    ev.add_argument("--data", required=True, help="prepared data directory (xlsr-jax prepare output)")
    ev.add_argument("--split", default="dev", help="split of the data set to score (default %(default)s)")
    # Defaults live in xlsr_jax.evaluate; importing it here would load JAX for every command.
    ev.add_argument("--batch-size", type=int, help="rows per batch over all devices, a multiple of their number "
                                                   "(default: evaluate.DEFAULT_BATCH_SIZE)")
    ev.add_argument("--num-buckets", type=int,
                    help="padded lengths, i.e. compiled programs (default: evaluate.DEFAULT_NUM_BUCKETS)")
    ev.add_argument("--output", help="JSON results (default: MODEL/eval_<data dir name>_<split>.json)")
    ev.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (default: 0, all)")
    ev.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype override")
    ev.add_argument("--lowercase", choices=["auto", "yes", "no"], default="auto",
                    help="CTC: lowercase the references; auto: when the model's vocabulary has no uppercase "
                         "letter, since the model cannot spell one (default %(default)s)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_cmd_evaluate)

    init = sub.add_parser("init", help="write a randomly initialized model directory")
    init.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    init.add_argument("--head", choices=HEADS, default="base")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--output", required=True)
    init.set_defaults(func=_cmd_init)

    pre = sub.add_parser("presets", help="list model presets with their parameter counts")
    pre.set_defaults(func=_cmd_presets)

    from xlsr_jax.demo import DEFAULT_MINUTES

    demo = sub.add_parser("demo", help="the whole system on the embedded corpus: prepare, pretrain (preempted and "
                                       "resumed), fit for TPU, fine-tune CTC and language ID, evaluate, export, report")
    demo.add_argument("--workdir", default="xlsr_jax_demo", help="where everything is written (default: %(default)s)")
    demo.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                      help="time budget on 2 CPU cores; scales the training steps (default: %(default)s)")
    demo.add_argument("--devices", type=int, default=2,
                      help="fake CPU devices the pretraining mesh spans (data parallel; default: %(default)s)")
    demo.set_defaults(func=_cmd_demo)

    prep = sub.add_parser("prepare", help="ingest audio files into ArrayRecord shards + dataset.json")
    prep.add_argument("inputs", nargs="+", help="audio folder, fairseq .tsv, Common Voice or LibriSpeech "
                                                "directory, or a corpus directory with manifest.tsv")
    prep.add_argument("output", help="output directory (new, empty, or an interrupted run to resume)")
    prep.add_argument("--layout", choices=LAYOUTS, help="input layout (default: detected)")
    prep.add_argument("--codec", choices=["pcm16", "flac"], default="pcm16")
    prep.add_argument("--num-shards", type=int, help="shards per split (default: from --records-per-shard)")
    prep.add_argument("--records-per-shard", type=int, default=2000)
    prep.add_argument("--min-seconds", type=float, default=0.5)
    prep.add_argument("--max-seconds", type=float, default=30.0)
    prep.add_argument("--split-long", action="store_true", help="cut files over --max-seconds into chunks")
    prep.add_argument("--split", help="split name for layouts without splits; otherwise keep only this split")
    lang = prep.add_mutually_exclusive_group()
    lang.add_argument("--language", help="language code for inputs the layout leaves unlabeled")
    lang.add_argument("--language-from-parent", action="store_true",
                      help="language = name of each audio file's parent directory")
    prep.add_argument("--strict", action="store_true", help="fail on the first bad input instead of skipping it")
    prep.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores; 0: none)")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.add_argument("--runner", choices=["direct", "dataflow", "flink", "spark"],
                      help="decode and write on Apache Beam (the beam extra) instead of local processes")
    prep.add_argument("--beam-option", action="append", default=[], metavar="--FLAG=VALUE",
                      help="a Beam pipeline option, repeatable (e.g. --beam-option=--direct_num_workers=4)")
    prep.set_defaults(func=_cmd_prepare)

    train = sub.add_parser("train", help="train (or resume) an experiment; extra --config.a.b=value override it",
                           description="Resumes from the newest checkpoint in --workdir by itself.")
    train.add_argument("--config", required=True, help="experiments/<file>.py[:preset]")
    train.add_argument("--workdir", required=True)
    _add_distributed_args(train)
    train.set_defaults(func=_cmd_train)

    fitp = sub.add_parser("fit", help="compile the train step for a TPU pod (or N CPU devices) from this machine: "
                                       "memory per chip, verdict, collectives, FLOPs; extra --config.a.b=value "
                                       "override the experiment")
    fitp.add_argument("--config", required=True, help="experiments/<file>.py[:preset]")
    fitp.add_argument("--topology", help="TPU pod or chip grid: v4-128, v5e-256, v5p-128, v6e-256, v5e:16x16, ...")
    fitp.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (multi-slice)")
    fitp.add_argument("--devices", type=int, help="instead of --topology: N fake CPU devices")
    fitp.add_argument("--num-samples", type=int, help="padded crop length (default: config.data.max_sample_size)")
    fitp.add_argument("--search", choices=["batch", "crop", "none"], default="none",
                      help="also find the largest global batch (or crop) that fits, by bisection (one compile per probe)")
    fitp.add_argument("--max-probes", type=int, default=6, help="compiles the --search may spend")
    fitp.add_argument("--fail-if-not-fit", action="store_true", help="exit 1 when it does not fit")
    fitp.add_argument("--dump-hlo", metavar="DIR", help="write the lowered and compiled programs' text here")
    fitp.set_defaults(func=_cmd_fit)

    lp = sub.add_parser("launch", help="render (and run) the commands that start `xlsr-jax train` on a pod: "
                                       "TPU VMs, GKE via xpk, or a SLURM GPU cluster")
    lp.add_argument("target", choices=["tpu", "xpk", "slurm"])
    lp.add_argument("--config", required=True, help="experiments/<file>.py[:preset]")
    lp.add_argument("--workdir", required=True, help="shared by every host, e.g. gs://bucket/run")
    lp.add_argument("--name", required=True, help="TPU VM / queued resource / xpk workload / SLURM job name")
    lp.add_argument("--dry-run", action="store_true", help="print what would run, create nothing")
    lp.add_argument("--accelerator-type", help="tpu, xpk: e.g. v5p-128, v5e-256, v6e-256")
    lp.add_argument("--num-slices", type=int, default=1, help="tpu, xpk: slices joined over DCN")
    lp.add_argument("--zone", help="tpu (required), xpk")
    lp.add_argument("--project")
    lp.add_argument("--runtime-version", default="tpu-ubuntu2204-base", help="tpu: TPU VM software version")
    lp.add_argument("--spot", action="store_true", help="tpu: spot capacity (preemptible: the job resumes itself)")
    lp.add_argument("--package", default="xlsr-jax[tpu]",
                    help="what `pip install` gets on each worker (a wheel path, a git URL, ...)")
    lp.add_argument("--cluster", help="xpk: the GKE cluster")
    lp.add_argument("--base-image", default="python:3.11", help="xpk: base image of the workload")
    lp.add_argument("--nodes", type=int, help="slurm: GPU nodes")
    lp.add_argument("--gpus-per-node", type=int, default=8, help="slurm")
    lp.add_argument("--partition", help="slurm")
    lp.add_argument("--time", default="24:00:00", help="slurm: time limit")
    lp.add_argument("--setup", default="", help="slurm: a shell line run before training (e.g. activating a venv)")
    lp.set_defaults(func=_cmd_launch)

    export = sub.add_parser("export", help="write a model directory from a training checkpoint")
    export.add_argument("--workdir", required=True, help="the training run's --workdir")
    export.add_argument("--output", required=True, help="new model directory")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    _add_distributed_args(export)
    export.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `xlsr-jax` command in this process (the console script is `console_main`)."""
    # `--config.a.b=value` overrides are not argparse options: split them off first.
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
    args.overrides = overrides
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        # Bad input is the user's to fix: one clear line; the traceback only when asked for.
        if args.verbose:
            traceback.print_exc()
        print(f"xlsr-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else is a bug: keep the traceback
        if "RESOURCE_EXHAUSTED" in str(e) and "emory" in str(e):  # the device's memory: the config asks too much
            if args.verbose:
                traceback.print_exc()
            print(f"xlsr-jax {args.command}: error: the accelerator ran out of memory "
                  f"({str(e).splitlines()[0][:300]}). Lower data.max_tokens or the batch, or set "
                  "--config.model.overrides.remat_policy=full (for long crops also "
                  "--config.model.overrides.conv_remat=True); `xlsr-jax fit` checks a config's memory before a run.",
                  file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"xlsr-jax {args.command}: internal error ({type(e).__name__}): {e}\n"
              "This is a bug in xlsr-jax, not in your input: please report it with the traceback above.",
              file=sys.stderr)
        return 1


def console_main() -> int:
    """The `xlsr-jax` console script: `main`, in a process whose malloc asks for huge pages (`xlsr_jax.host_memory`)."""
    reexec_with_huge_pages()
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
