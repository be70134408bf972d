"""Draws docs/pipeline.png, the README's one picture: teacher graph → traces → student → phone."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch


def box(ax, x, y, w, h, title, lines, color):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.04", fc=color, ec="#333", lw=1.2))
    ax.text(x + w / 2, y + h - 0.07, title, ha="center", va="top", fontsize=11, weight="bold")
    for i, ln in enumerate(lines):
        ax.text(x + w / 2, y + h - 0.22 - i * 0.11, ln, ha="center", va="top", fontsize=7.8)


def arrow(ax, x0, x1, y, label):
    ax.add_patch(FancyArrowPatch((x0, y), (x1, y), arrowstyle="-|>", mutation_scale=16, lw=1.4, color="#333"))
    ax.text((x0 + x1) / 2, y + 0.05, label, ha="center", va="bottom", fontsize=7.5, style="italic")


def main() -> None:
    fig, ax = plt.subplots(figsize=(11, 3.0), dpi=130)
    ax.set_xlim(0, 4.4)
    ax.set_ylim(0, 1.05)
    ax.axis("off")
    box(ax, 0.0, 0.1, 1.12, 0.9, "teacher graph (LangGraph)",
        ["image + question", "YOLO11n detect", "MobileSAM segment ‖ Chroma retrieve", "SmolLM2 reason",
         "→ answer, objects+masks, sources", "~3 s / query, ~235 MB"], "#dbe9f6")
    box(ax, 1.32, 0.1, 0.85, 0.9, "traces",
        ["one typed record per run", "every node's I/O, timings,", "model ids + sha256", "SQLite WAL + blobs",
         "K samples per input"], "#e8f3e0")
    box(ax, 2.42, 0.1, 0.85, 0.9, "filtered dataset",
        ["majority vote", "cross-node checks", "user rules, dedup", "splits by source photo", "report of kept/dropped"],
        "#fbefd9")
    box(ax, 3.52, 0.1, 0.85, 0.9, "student → phone",
        ["one small network", "image + question in", "answer, boxes, masks,", "sources out",
         "ExecuTorch / ONNX int8"], "#f6dede")
    arrow(ax, 1.13, 1.31, 0.55, "record")
    arrow(ax, 2.18, 2.41, 0.55, "filter")
    arrow(ax, 3.28, 3.51, 0.55, "train+export")
    out = Path(__file__).with_name("pipeline.png")
    fig.savefig(out, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()
