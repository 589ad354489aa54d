"""Integrations with training frameworks. Each submodule imports its framework lazily;
``import geko_core`` never imports them."""
