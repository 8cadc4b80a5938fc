"""``cmae serve``: the web UI and its JSON API (needs the ``web`` extra: Flask)."""

from catchment_mae.web.app import create_app

__all__ = ["create_app"]
