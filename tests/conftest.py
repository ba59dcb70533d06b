import os
from pathlib import Path

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent/'shared'


@pytest.fixture(scope='session')
def root(): return ROOT


@pytest.fixture(scope='session')
def shared():
    if not SHARED.exists(): pytest.skip(f'{SHARED} (the shared data folder beside the checkout) is absent')
    return SHARED
