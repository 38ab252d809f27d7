"""``kla-launch``: check a run's parallel layout against the job's world size, then start it with
Slurm, torchrun or the DeepSpeed launcher, printing exactly what runs.

    kla-launch --config configs/1.3b.yaml --nodes 4 --gpus-per-node 8 --scheduler slurm --dry-run
    kla-launch --config configs/1.3b.yaml --nodes 2 --gpus-per-node 8 --scheduler torchrun \\
        --master-addr node001 --node-rank 0        # run on every node with its own --node-rank
    kla-launch --config configs/tiny_cpu_deepspeed.yaml --scheduler deepspeed --hostfile hosts.txt

The layout check loads the run config with the trainer's own loader and validator
(``kla_megatron.training.config``), so a launch that the trainer would reject fails here, before
an allocation is spent. All three schedulers start ``python -m kla_megatron.train`` with the
same ``--config`` and ``--set`` arguments, through ``launch/slurm/*.sbatch``, ``launch/torchrun.sh``
and ``launch/deepspeed.sh``. Exit status: 0 submitted/ran (or printed, with --dry-run),
2 bad arguments or layout, otherwise the scheduler's own status.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

LAUNCH_DIR = Path(__file__).resolve().parents[1] / "launch"
SCHEDULERS = ("slurm", "torchrun", "deepspeed")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="kla-launch", description=__doc__.split("\n\n")[0].replace("``", "`"))
    ap.add_argument("--config", required=True, help="run config (configs/<name>.yaml or a name in configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override passed to the trainer (repeatable)")
    ap.add_argument("--scheduler", required=True, choices=SCHEDULERS)
    ap.add_argument("--nodes", type=int, default=None, help="number of nodes (deepspeed: default from the hostfile)")
    ap.add_argument("--gpus-per-node", type=int, default=None,
                    help="processes (GPUs) per node (deepspeed: default from the hostfile's slots)")
    ap.add_argument("--cpu", action="store_true",
                    help="CPU-only nodes: no GPU request in sbatch, DS_ACCELERATOR=cpu for deepspeed")
    ap.add_argument("--dry-run", action="store_true", help="check and print the commands without running them")
    slurm = ap.add_argument_group("slurm")
    slurm.add_argument("--template", default=None, help="sbatch template (default: single_node or multi_node)")
    slurm.add_argument("--job-name", default=None, help="default: the config's run_name")
    slurm.add_argument("--time", default=None, help="time limit, e.g. 04:00:00")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--signal-seconds", type=int, default=None,
                       help="send SIGUSR1 this many seconds before the time limit (template default 300)")
    slurm.add_argument("--chain", type=int, default=1,
                       help="submit N jobs, each --dependency=afterany on the previous (resume chain; no requeue)")
    slurm.add_argument("--cluster-env", default=None, help="per-cluster env file (default launch/slurm/env/default.env)")
    slurm.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch argument (repeatable)")
    tr = ap.add_argument_group("torchrun")
    tr.add_argument("--master-addr", default=None, help="rendezvous host (torchrun: required with --nodes > 1)")
    tr.add_argument("--master-port", type=int, default=None)
    tr.add_argument("--node-rank", type=int, default=None, help="torchrun: this node's index")
    ds = ap.add_argument_group("deepspeed")
    ds.add_argument("--hostfile", default=None, help="deepspeed hostfile ('<host> slots=<n>' lines)")
    return ap.parse_args(argv)


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """'<host> slots=<n>' lines (comments and blank lines ignored) -> [(host, n), ...]."""
    if not os.path.exists(path):
        raise ValueError(f"--hostfile {path} does not exist")
    hosts = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit() or int(parts[1][6:]) < 1:
            raise ValueError(f"--hostfile {path}:{lineno}: expected '<host> slots=<n>', got {line!r}")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise ValueError(f"--hostfile {path} lists no hosts")
    if len({n for _, n in hosts}) != 1:
        raise ValueError(f"--hostfile {path}: every host needs the same slots (the layout assumes equal nodes), got {hosts}")
    return hosts


def resolve_world(args) -> tuple[int, int]:
    """(nodes, processes per node), from the arguments or, for deepspeed, the hostfile."""
    nodes, gpn = args.nodes, args.gpus_per_node
    if args.scheduler == "deepspeed" and args.hostfile:
        hosts = read_hostfile(args.hostfile)
        if nodes is not None and nodes != len(hosts):
            raise ValueError(f"--nodes {nodes} but --hostfile {args.hostfile} lists {len(hosts)} hosts")
        if gpn is not None and gpn != hosts[0][1]:
            raise ValueError(f"--gpus-per-node {gpn} but --hostfile {args.hostfile} gives slots={hosts[0][1]}")
        nodes, gpn = len(hosts), hosts[0][1]
    if nodes is None or gpn is None:
        raise ValueError("--nodes and --gpus-per-node are required" +
                         (" (or a --hostfile)" if args.scheduler == "deepspeed" else ""))
    if nodes < 1 or gpn < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpn}")
    return nodes, gpn


def check_world_layout(args, world: int):
    """Validate the run config exactly as the trainer will, for this world size."""
    from kla_megatron.training.config import load_run_config

    run = load_run_config(args.config, args.overrides)
    dp = run.validate_world(world)
    if args.scheduler == "deepspeed" and run.engine != "deepspeed":
        raise ValueError(f"--scheduler deepspeed needs a config with engine: deepspeed, {args.config} has engine "
                         f"'{run.engine}' (use --scheduler torchrun or slurm, or --set engine=deepspeed)")
    return run, dp


def train_args(args) -> list[str]:
    out = ["--config", args.config]
    for o in args.overrides:
        out += ["--set", o]
    return out


def slurm_commands(args, run, nodes: int, gpn: int) -> list[tuple[dict, list[str]]]:
    template = args.template or str(LAUNCH_DIR / "slurm" / ("single_node.sbatch" if nodes == 1 else "multi_node.sbatch"))
    env = {"GPUS_PER_NODE": str(gpn), "KLA_REPO": str(LAUNCH_DIR.parent)}
    if args.cluster_env:
        env["KLA_CLUSTER_ENV"] = args.cluster_env
    if args.chain > 1:
        env["KLA_REQUEUE"] = "0"  # the next job in the chain resumes; a requeue would run twice
    export = "ALL," + ",".join(f"{k}={v}" for k, v in env.items())
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--ntasks-per-node=1",
           f"--job-name={args.job_name or run.run_name}", f"--export={export}"]
    cmd.append("--gpus-per-node=0" if args.cpu else f"--gpus-per-node={gpn}")
    for flag, value in (("--time", args.time), ("--partition", args.partition), ("--account", args.account)):
        if value:
            cmd.append(f"{flag}={value}")
    if args.signal_seconds is not None:
        cmd.append(f"--signal=B:USR1@{args.signal_seconds}")
    cmd += args.sbatch_arg + [template] + train_args(args)
    if args.chain < 1:
        raise ValueError(f"--chain must be >= 1, got {args.chain}")
    return [({}, cmd)] + [({}, cmd[:2] + ["--dependency=afterany:<previous job id>"] + cmd[2:])
                          for _ in range(args.chain - 1)]


def torchrun_command(args, nodes: int, gpn: int) -> tuple[dict, list[str]]:
    if nodes > 1 and not args.master_addr:
        raise ValueError(f"--master-addr is required with --nodes {nodes} (the rendezvous host, e.g. the first node)")
    if args.node_rank is not None and not 0 <= args.node_rank < nodes:
        raise ValueError(f"--node-rank must be in [0, {nodes}), got {args.node_rank}")
    node_rank = args.node_rank
    if node_rank is None:
        node_rank = os.environ.get("NODE_RANK", os.environ.get("SLURM_NODEID", "0" if nodes == 1 else None))
        if node_rank is None:
            raise ValueError(f"--node-rank is required with --nodes {nodes} (or NODE_RANK in the environment)")
    env = {"NNODES": str(nodes), "GPUS_PER_NODE": str(gpn), "NODE_RANK": str(node_rank)}
    if args.master_addr:
        env["MASTER_ADDR"] = args.master_addr
    if args.master_port:
        env["MASTER_PORT"] = str(args.master_port)
    return env, ["bash", str(LAUNCH_DIR / "torchrun.sh")] + train_args(args)


def deepspeed_command(args, nodes: int, gpn: int) -> tuple[dict, list[str]]:
    if nodes > 1 and not args.hostfile:
        raise ValueError(f"--hostfile is required for deepspeed with --nodes {nodes}")
    env = {"NUM_NODES": str(nodes), "GPUS_PER_NODE": str(gpn)}
    if args.hostfile:
        env["HOSTFILE"] = args.hostfile
    if args.master_addr:
        env["MASTER_ADDR"] = args.master_addr
    if args.master_port:
        env["MASTER_PORT"] = str(args.master_port)
    if args.cpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env, ["bash", str(LAUNCH_DIR / "deepspeed.sh")] + train_args(args)


def show(env: dict, cmd: list[str]) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(c) for c in cmd])


def submit_chain(commands) -> int:
    previous = None
    for env, cmd in commands:
        cmd = [f"--dependency=afterany:{previous}" if c == "--dependency=afterany:<previous job id>" else c for c in cmd]
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        sys.stderr.write(out.stderr)
        if out.returncode:
            return out.returncode
        previous = out.stdout.strip().split(";")[0]
        print(f"kla-launch: submitted job {previous}", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        nodes, gpn = resolve_world(args)
        run, dp = check_world_layout(args, nodes * gpn)
        p = run.parallel
        print(f"kla-launch: {nodes} node(s) x {gpn} = world {nodes * gpn}: tensor {p.tensor} x pipeline {p.pipeline} "
              f"x context {p.context} x data {dp} (engine {run.engine})", flush=True)
        if args.scheduler == "slurm":
            commands = slurm_commands(args, run, nodes, gpn)
        elif args.scheduler == "torchrun":
            commands = [torchrun_command(args, nodes, gpn)]
        else:
            commands = [deepspeed_command(args, nodes, gpn)]
    except ValueError as exc:
        print(f"kla-launch: error: {exc}", file=sys.stderr)
        return 2
    for env, cmd in commands:
        print(("would run: " if args.dry_run else "running: ") + show(env, cmd), flush=True)
    if args.scheduler == "torchrun" and nodes > 1:
        print(f"kla-launch: run the same command on every node with NODE_RANK=0..{nodes - 1}", flush=True)
    if args.dry_run:
        return 0
    if args.scheduler == "slurm":
        os.makedirs("logs", exist_ok=True)  # the templates' sbatch --output folder; Slurm does not create it
        return submit_chain(commands)
    env, cmd = commands[0]
    return subprocess.run(cmd, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main())
