"""Word-in-context accuracy of a biLM's layers on the WordNet WiC set (benchmarks/data/wic).

    python benchmarks/eval_wic.py                                  # the built-in English model
    python benchmarks/eval_wic.py --options O.json --weights W.hdf5

As WiC's unsupervised baselines (Pilehvar and Camacho-Collados, 2019): the cosine similarity of the
target word's vectors in the two sentences of a pair, "same sense" when it exceeds a threshold. The
threshold is the one that maximises dev accuracy; test accuracy is reported for the token layer (the
char-CNN word vector, which ignores context: the context-free baseline), LSTM layer 1, layer 2 and
the average of the three. Each sentence is embedded once, alone (stateless), by ``elmo_jax.Embedder``.
Prints a table, then one JSON line with every figure. The set is built by benchmarks/make_wic.py.

Both sentences of a pair write the target the same way, so the token layer gives both the same vector
and scores chance by construction. The LSTM layers see the other words of the sentence, and examples
of one synset often share words ('interest', 'money'): even an untrained network profits from that.
So the same evaluation also runs on a random biLM of the same options (``elmo_jax.init_params``, seed
0; ``--no-random-control`` skips it): what a trained model scores above that control is learned.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "wic")
COLUMNS = ["lemma", "pos", "label", "sentence1", "index1", "sentence2", "index2"]
# Test accuracy (%) for reference: WiC paper (NAACL 2019), ELMo, cosine of the target's vectors with
# a dev-tuned threshold, on WiC's own test set (different sentences and sense pruning than this set).
REFERENCE = {"WiC paper, ELMo (original 5.5B-token model), WiC test": 57.7, "chance (balanced labels)": 50.0}


def read_split(path: str) -> list[dict]:
    """Rows of dev.tsv / test.tsv with label and indices as ints; checks the header and the targets."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header != COLUMNS:
            raise SystemExit(f"{path}: expected columns {COLUMNS}, found {header}")
        rows = []
        for line_no, fields in enumerate(reader, 2):
            row = dict(zip(COLUMNS, fields))
            row["label"], row["index1"], row["index2"] = int(row["label"]), int(row["index1"]), int(row["index2"])
            for k in "12":
                if not 0 <= row[f"index{k}"] < len(row[f"sentence{k}"].split()):
                    raise SystemExit(f"{path}:{line_no}: index{k} {row[f'index{k}']} is outside sentence{k}")
            rows.append(row)
    return rows


def target_vectors(embedder, splits: dict[str, list[dict]]) -> dict[str, np.ndarray]:
    """{split: (pairs, 2, layers, dim)}: all layers of the target token of both sentences of each pair."""
    sentences = sorted({row[f"sentence{k}"] for rows in splits.values() for row in rows for k in "12"})
    index = {s: i for i, s in enumerate(sentences)}
    activations = list(embedder.embed_sentences([s.split() for s in sentences], mode="all"))  # (layers, n, dim) each
    out = {}
    for name, rows in splits.items():
        out[name] = np.stack([
            np.stack([activations[index[row[f"sentence{k}"]]][:, row[f"index{k}"]] for k in "12"]) for row in rows
        ])  # (pairs, 2, layers, dim)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (n, dim) arrays -> (n,)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.sum(a * b, axis=-1) / np.maximum(norms, 1e-12)


def best_threshold(similarity: np.ndarray, labels: np.ndarray) -> float:
    """The threshold t maximising the accuracy of "same sense iff similarity > t" (midpoint of the best gap)."""
    order = np.argsort(similarity, kind="stable")
    s, y = similarity[order], labels[order]
    # Cutting after the first k sorted pairs: they are called "different", the rest "same".
    correct = np.concatenate([[0], np.cumsum(y == 0)]) + np.concatenate([np.cumsum((y == 1)[::-1])[::-1], [0]])
    valid = np.ones(len(s) + 1, bool)
    valid[1:-1] = s[1:] > s[:-1]  # cannot cut between equal similarities
    k = int(np.argmax(np.where(valid, correct, -1)))
    if k == 0:  # every pair "same": just below the smallest similarity
        return float(np.nextafter(s[0], -np.inf))
    if k == len(s):
        return float(s[-1])
    return float((s[k - 1] + s[k]) / 2)


def accuracy(similarity: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(np.mean((similarity > threshold) == (labels == 1)))


def representations(vectors: np.ndarray, n_layers: int) -> dict[str, np.ndarray]:
    """(pairs, 2, layers, dim) -> {name: (pairs, 2, dim)} for the token layer, each LSTM layer, the average."""
    reps = {"token layer": vectors[:, :, 0]}
    for layer in range(1, n_layers):
        reps[f"layer {layer}"] = vectors[:, :, layer]
    reps["average of layers"] = vectors.mean(axis=2)
    return reps


def evaluate(vectors: dict[str, np.ndarray], splits: dict[str, list[dict]]) -> dict[str, dict]:
    """{representation: threshold, dev and test accuracy, test accuracy per part of speech}."""
    labels = {name: np.array([row["label"] for row in rows]) for name, rows in splits.items()}
    pos = np.array([row["pos"] for row in splits["test"]])
    n_layers = vectors["dev"].shape[2]
    dev_reps, test_reps = representations(vectors["dev"], n_layers), representations(vectors["test"], n_layers)
    results = {}
    for name in dev_reps:
        dev_sim = cosine(dev_reps[name][:, 0], dev_reps[name][:, 1])
        test_sim = cosine(test_reps[name][:, 0], test_reps[name][:, 1])
        threshold = best_threshold(dev_sim, labels["dev"])
        results[name] = {
            "threshold": round(threshold, 6),
            "dev_accuracy": round(accuracy(dev_sim, labels["dev"], threshold), 4),
            "test_accuracy": round(accuracy(test_sim, labels["test"], threshold), 4),
            **{f"test_accuracy_{p}": round(accuracy(test_sim[pos == p], labels["test"][pos == p], threshold), 4)
               for p in sorted(set(pos))},
        }
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--options", help="options.json of the biLM (default: the built-in English model)")
    p.add_argument("--weights", help="HDF5 weights of the biLM (default: the built-in English model)")
    p.add_argument("--data", default=DATA, help="folder with dev.tsv and test.tsv")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-random-control", action="store_true", help="skip the untrained (random) biLM control")
    args = p.parse_args(argv)
    if (args.options is None) != (args.weights is None):
        p.error("--options and --weights go together (leave both out for the built-in model)")

    import jax

    import elmo_jax
    from elmo_jax.pretrained import default_model_files

    if args.options is None:
        args.options, args.weights = default_model_files()
    start = time.perf_counter()
    splits = {name: read_split(os.path.join(args.data, f"{name}.tsv")) for name in ("dev", "test")}
    model = elmo_jax.BiLM.from_hdf5(args.options, args.weights)
    results = evaluate(target_vectors(elmo_jax.Embedder(model=model, batch_size=args.batch_size), splits), splits)
    control = None
    if not args.no_random_control:
        random_model = elmo_jax.BiLM(elmo_jax.init_params(model.options, jax.random.key(0)), model.options)
        embedder = elmo_jax.Embedder(model=random_model, batch_size=args.batch_size)
        control = evaluate(target_vectors(embedder, splits), splits)
    seconds = time.perf_counter() - start

    n_test = len(splits["test"])
    parts = sorted({row["pos"] for row in splits["test"]})
    print(f"WiC (WordNet examples): dev {len(splits['dev'])} pairs, test {n_test} pairs; model {args.weights}")
    header = ["representation", "threshold", "dev acc", "test acc"] + [f"test {p}" for p in parts]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    rows = [(name, r) for name, r in results.items()]
    rows += [(f"random biLM (control), {name}", r) for name, r in (control or {}).items()]
    for name, r in rows:
        cells = [name, f"{r['threshold']:.3f}", f"{100 * r['dev_accuracy']:.1f}", f"{100 * r['test_accuracy']:.1f}"]
        print(" | ".join(cells + [f"{100 * r[f'test_accuracy_{p}']:.1f}" for p in parts]))
    for name, value in REFERENCE.items():
        print(f"{name} | | | {value:.1f}" + " |" * len(parts))
    print(f"(standard error of a test accuracy near 60%: {100 * math.sqrt(0.24 / n_test):.1f} points; "
          f"{seconds:.0f} s)")
    print(json.dumps({"benchmark": "wic_wordnet", "options": os.path.abspath(args.options),
                      "weights": os.path.abspath(args.weights), "dev_pairs": len(splits["dev"]),
                      "test_pairs": n_test, "results": results, "random_control": control,
                      "reference_test_accuracy": REFERENCE,
                      "seconds": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
