import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Google's client libraries probe the GCE metadata server for credentials; keep every probe on
# this machine (the discard port) before any of them is imported. tests/gcs_emulator.py
# points them at a local GCS.
os.environ.setdefault('NO_GCE_CHECK', 'true')
for _name in ('GCE_METADATA_HOST', 'GCE_METADATA_IP', 'GCE_METADATA_ROOT'):
  os.environ.setdefault(_name, '127.0.0.1:9')

pytest_plugins = ['tests.gcs_emulator']
