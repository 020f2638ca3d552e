"""Readers of upstream formats, dispatched by `DataConfig.dataset_format`."""

from __future__ import annotations

from hanorec.data.config import DataConfig
from hanorec.data.readers.amazon import read_amazon_meta, read_amazon_reviews
from hanorec.data.readers.movielens import (
    read_ml1m_interactions,
    read_ml1m_items,
    read_ml100k_interactions,
    read_ml100k_items,
)
from hanorec.data.readers.recbole import read_atomic_inter, read_atomic_item
from hanorec.data.readers.table import read_table_interactions, read_table_items
from hanorec.data.tables import Catalogue, Interactions

__all__ = ["read_source", "read_amazon_meta", "read_amazon_reviews", "read_ml1m_interactions",
           "read_ml1m_items", "read_ml100k_interactions", "read_ml100k_items",
           "read_atomic_inter", "read_atomic_item", "read_table_interactions",
           "read_table_items"]

_FIXED = {
    "recbole": (read_atomic_inter, read_atomic_item),
    "ml-100k": (read_ml100k_interactions, read_ml100k_items),
    "ml-1m": (read_ml1m_interactions, read_ml1m_items),
    "amazon2023": (read_amazon_reviews, read_amazon_meta),
}


def read_source(config: DataConfig) -> tuple[Interactions, Catalogue]:
    """Read the interactions and the catalogue named by `config`."""
    inter_path, items_path = config.path(config.interactions_path), config.path(config.items_path)
    if config.dataset_format in _FIXED:
        read_inter, read_items = _FIXED[config.dataset_format]
        return (read_inter(inter_path, encoding=config.encoding),
                read_items(items_path, encoding=config.encoding))
    interactions = read_table_interactions(
        inter_path, user=config.user_column, item=config.item_column,
        timestamp=config.timestamp_column, rating=config.rating_column, encoding=config.encoding)
    catalogue = read_table_items(
        items_path, item_id=config.item_id_column, title=config.title_column,
        genres=config.genres_column, genres_separator=config.genres_separator,
        image=config.image_column, encoding=config.encoding)
    return interactions, catalogue
