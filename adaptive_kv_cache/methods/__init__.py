"""Compression methods over the shared packed store, one file each; `adaptive_kv_cache.registry` names them."""
