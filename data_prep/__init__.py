from pathlib import Path

SAMPLE_CORPUS = Path(__file__).resolve().parent / "sample" / "corpus.jsonl.gz"
"""The bundled sample corpus: 618 documents of English prose as jsonl (see sample/README.md)."""
