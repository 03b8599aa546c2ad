"""On PYTHONPATH, makes `import redis` fail the way it does where the redis extra is not installed."""

import sys

sys.modules["redis"] = None
