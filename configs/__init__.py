"""Configs as code: each preset's get_config() returns an ml_collections.ConfigDict."""
