"""Durable state: pending ids, counts and offsets per partition, on local disk and in a changelog.

* :mod:`.codec` — the on-disk and changelog format (explicit, versioned)
* :mod:`.rocks` — the local store (RocksDB)
* :mod:`.ids` — one partition's id records: an overlay of changes and the two ordered indexes
* :mod:`.restore` — rebuilding a partition from its changelog records

``docs/state.md`` describes the checkpoint protocol and why no crash loses or double-counts an
event.
"""
