"""Write docs/configuration.md from the config's declaration."""

from pathlib import Path

from dlharness.training.config_reference import markdown

if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    target.write_text(markdown())
    print(f"wrote {target}")
