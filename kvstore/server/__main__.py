"""``python -m kvstore.server``: the same as the ``kvstore-server`` command."""

import sys

from kvstore.server.main import main

sys.exit(main())
