"""Stage `prepare`: the image folder the `train` stage reads, one sub-folder per class.

python prepare.py OUT                 # scikit-learn's bundled 8×8 digits as PNG files
python prepare.py --from DIR OUT      # your own images: DIR/<class>/<image>, copied as is
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def write_digits(out: Path) -> int:
    bunch = load_digits()
    # The bundled pixels are integers 0..16; PNG wants 0..255.
    pixels = np.rint(bunch.images / 16 * 255).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, bunch.target, strict=True)):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:04d}.png")
    return len(pixels)


def copy_images(source: Path, out: Path) -> int:
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    if len(classes) < 2:
        sys.exit(f"prepare.py: {source} needs at least 2 class sub-folders")
    count = 0
    for folder in classes:
        for image in sorted(folder.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                (out / folder.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(image, out / folder.name / image.name)
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the image folder to write (replaced)")
    parser.add_argument("--from", dest="source", type=Path, help="a folder of your own images")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    count = copy_images(args.source, args.out) if args.source else write_digits(args.out)
    print(f"prepare.py: {count} images in {args.out}")


if __name__ == "__main__":
    main()
