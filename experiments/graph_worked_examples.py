"""The two worked examples of docs/derivation.md#worked-examples, differentiated.

Builds with fnnet.graph:
  1. linear regression, L = (wᵀx − y)², with w = (0.65, 1.19) (the first row of
     example 2's W), x = (0.2, 0.7) and y = 1;
  2. softmax regression with cross-entropy, with
     W = [[0.65, 1.19], [0.69, −0.92]], x = (0.2, 0.7), b = 0, y = (1, 0),
and prints every node's value and derivative dL/dnode (reverse mode,
docs/derivation.md eq. 22), writes the DOT files (and images, when Graphviz
`dot` is installed) and a Markdown copy of the tables to
experiments/results/graph/, and checks dL/db_1 = yhat_1 − y_1 (eq. 7).

Run from the repository root: python experiments/graph_worked_examples.py
"""

import math
import shutil
from pathlib import Path

from fnnet import graph

OUT_DIR = Path(__file__).resolve().parent / "results" / "graph"

LINREG_W = [0.65, 1.19]
LINREG_X = [0.2, 0.7]
LINREG_Y = 1.0

SOFTMAX_W = [[0.65, 1.19], [0.69, -0.92]]
SOFTMAX_X = [0.2, 0.7]
SOFTMAX_B = [0.0, 0.0]
SOFTMAX_Y = [1.0, 0.0]


def report(title, nodes, out_dir):
    """Prints and returns the node table; writes the DOT file (and an image)."""
    loss = nodes["L"]
    grads = graph.backward(loss)
    stem = title.lower().replace(" ", "_")
    (out_dir / f"{stem}.dot").write_text(graph.to_dot(loss, grads))
    if shutil.which("dot"):
        graph.render(loss, out_dir / f"{stem}.svg", grads)
    text = f"## {title}\n\n{graph.table(loss, grads)}"
    print(text)
    return text, grads


def main():
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    sections = [
        "# Worked examples: values and derivatives dL/dnode\n\n"
        "Written by experiments/graph_worked_examples.py; node numbers are the "
        "topological order, `parents` lists the parents' numbers. The examples "
        "are worked through in docs/derivation.md#worked-examples.\n"
    ]

    nodes = graph.linear_regression(LINREG_W, LINREG_X, LINREG_Y)
    text, grads = report("Linear regression", nodes, OUT_DIR)
    sections.append(text)
    r = nodes["r"].value
    for k, x_k in enumerate(LINREG_X, 1):
        assert math.isclose(grads[nodes[f"w{k}"]], 2 * r * x_k, rel_tol=1e-12)
    print(f"dL/dw = 2 (wᵀx − y) x: r = {r:.6g}, checked.\n")

    nodes = graph.softmax_regression(SOFTMAX_W, SOFTMAX_X, SOFTMAX_B, SOFTMAX_Y)
    text, grads = report("Softmax regression", nodes, OUT_DIR)
    db1 = grads[nodes["b1"]]
    yhat1_minus_y1 = nodes["yhat1"].value - SOFTMAX_Y[0]
    assert math.isclose(db1, yhat1_minus_y1, rel_tol=1e-12), (db1, yhat1_minus_y1)
    check = f"dL/db_1 = {db1:.12g}, yhat_1 - y_1 = {yhat1_minus_y1:.12g}: equal.\n"
    print(check)
    sections.append(text + "\n" + check)

    if not shutil.which("dot"):
        print("Graphviz `dot` is not installed: wrote .dot files, no images.")
    (OUT_DIR / "worked_examples.md").write_text("\n".join(sections))
    print(f"Wrote {OUT_DIR}")


if __name__ == "__main__":
    main()
