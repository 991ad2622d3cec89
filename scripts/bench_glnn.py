"""Inference time of the GCN teacher against the MLP student on the test nodes of a CSBM graph (GLNN's argument:
an MLP needs no graph at inference).

    python scripts/bench_glnn.py                       # data=csbm's graph (2000 nodes), CPU, 1 thread
    python scripts/bench_glnn.py --nodes 20000 --reps 20

The models are data=csbm's teacher=gcn (2 layers, 64 hidden) and student=mlp_graph (128 hidden), untrained:
their cost does not depend on their weights. The GCN propagates over the whole graph, as kd_lab/models/gnn.py
does; the MLP reads the test nodes' features only. Time: median over --reps of one forward under no_grad; the
two models alternate rep by rep, so a load change on a shared machine hits both alike. One untimed warm-up
first. It prints both times and their ratio; nothing is asserted.
"""

import argparse
import statistics
import sys
import tempfile
import time

import torch

from kd_lab.data.graph import CSBMDataModule
from kd_lab.models.gnn import GCN
from kd_lab.models.mlp import MLP


def timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000, help="CSBM nodes (data=csbm: 2000)")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--setting", default="inductive", choices=("transductive", "inductive"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # p_in and p_out scale with 1/n so the mean degree stays data=csbm's at any size
    scale = 2000 / args.nodes
    with tempfile.TemporaryDirectory() as data_dir:
        dm = CSBMDataModule(
            num_nodes=args.nodes, p_in=0.01 * scale, p_out=0.001 * scale, setting=args.setting, data_dir=data_dir
        )
        dm.setup()
    gcn, mlp = GCN((32,), 5, hidden=(64,)), MLP((32,), 5, hidden=(128,))
    gcn.bind_data(dm)
    gcn.eval(), mlp.eval()
    test = dm.splits["test"]
    times: dict[str, list[float]] = {"gcn": [], "mlp": []}
    with torch.no_grad():
        gcn(test["teacher_input"]), mlp(test["input"])  # warm-up
        for _ in range(args.reps):
            times["gcn"].append(timed(gcn, test["teacher_input"]))
            times["mlp"].append(timed(mlp, test["input"]))
    gcn_ms, mlp_ms = (1000 * statistics.median(times[k]) for k in ("gcn", "mlp"))
    edges = dm.graph.edges.shape[1]
    tested = len(test["target"])
    print(f"{args.nodes} nodes, {edges} edges, {tested} test nodes ({args.setting}), {args.threads} thread(s)")
    print(f"GCN (whole-graph propagation): {gcn_ms:.3f} ms")
    print(f"MLP (test nodes' features):    {mlp_ms:.3f} ms")
    print(f"speed-up of the MLP: {gcn_ms / mlp_ms:.1f}x")
    return {"gcn_ms": gcn_ms, "mlp_ms": mlp_ms, "ratio": gcn_ms / mlp_ms}


if __name__ == "__main__":
    main(sys.argv[1:])
