"""Generate the out-of-distribution corpus (tasks/ood_corpus.py) into a folder:

    python tests/data/make_ood_corpus.py OUT_DIR [--studies ../shared/data/studies]

Far items (photos, microscopy, MR/CT slices, an MR DICOM relabelled Modality CR, noise, a page
of text, blank frames) and, with --studies, the near cases (the shared NIH radiograph rotated
90 degrees, upside down, inverted). Writes OUT_DIR/manifest.json ({file name: "far" | "near"}).
"""

from __future__ import annotations

import argparse
import sys

from tasks.evaluation.ood_corpus import FAR, NEAR, make_ood_corpus

__all__ = ["FAR", "NEAR", "make_ood_corpus"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--studies", default=None, help="folder holding 00000001_000.png (near cases); omitted: none")
    args = parser.parse_args(argv)
    manifest = make_ood_corpus(args.out_dir, args.studies)
    print(f"wrote {len(manifest)} files to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
