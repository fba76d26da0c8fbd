"""Test helpers (no tests here): tiny models, the ComfyUI test server, reference scorers, the fuzzer.

Imported as ``tests.helpers.<module>``; pytest puts the pack root on sys.path (pyproject's
``pythonpath``), a script run from the pack root as ``python -m tests.helpers.<module>``.
"""

from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
