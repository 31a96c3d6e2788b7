"""One line per model and batch of a ``bench/decode.py`` JSON: kiln's tok/s (and its variant's), the peer's, the ratio.

    python bench/decode_summary.py decode.json
"""
import json
import sys


def main() -> None:
    res = json.load(open(sys.argv[1]))
    for name, model in res.items():
        if not isinstance(model, dict):
            continue
        for key, case in model.items():
            if not key.startswith("bs"):
                continue
            tok = {who: round(case[who]["decode_tok_s"]) for who in ("kiln", "kiln_variant", "peer") if who in case}
            ratio = case.get("kiln_speedup")
            print(name, key, tok, f"kiln / peer {ratio:.2f}x" if ratio else "", case.get("ab_tok_s", ""))


if __name__ == "__main__":
    main()
