from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from billing.catalog import CATALOG_DIR, catalog_for, load_catalog, load_catalogs
from billing.errors import CatalogError

SHIPPED = (CATALOG_DIR / "2019-10.toml").read_text()


def test_shipped_catalog_matches_the_rule_book() -> None:
    c = catalog_for("2026-10")
    assert (c.version, c.currency, c.minor_units) == ("2019-10", "JPY", 0)
    assert (c.standard_unit_price, c.micro_unit_price) == (1833, 660)
    assert (c.tax_rate, c.prices_include_tax) == (Fraction(1, 10), True)
    assert (c.standard_host_metrics, c.micro_host_metrics) == (200, 30)
    assert (c.service_metrics, c.external_monitors) == (200, 20)
    assert (c.anomaly_detection_hosts_per_unit, c.free_plan_hosts) == (5, 5)
    assert c.minimum_standard_units == 1


def test_a_later_catalog_takes_effect_from_its_month_only(tmp_path: Path) -> None:
    (tmp_path / "2019-10.toml").write_text(SHIPPED)
    later = SHIPPED.replace('version = "2019-10"', 'version = "2027-04"').replace(
        'effective_from = "2019-10-01"', 'effective_from = "2027-04-01"').replace(
        "standard_unit = 1833", "standard_unit = 1980")
    (tmp_path / "2027-04.toml").write_text(later)
    catalogs = load_catalogs(tmp_path)
    assert catalog_for("2027-03", catalogs).version == "2019-10"
    assert catalog_for("2027-04", catalogs).version == "2027-04"
    assert catalog_for("2027-04", catalogs).standard_unit_price == 1980
    assert catalog_for("2028-01", catalogs).version == "2027-04"
    with pytest.raises(CatalogError, match="no catalog is in force"):
        catalog_for("2019-09", catalogs)


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("standard_unit = 1833", "standard_unit = 1833.5", "prices.standard_unit"),
        ("micro_unit = 660", "micro_unit = -1", "prices.micro_unit"),
        ('rate = "0.10"', "rate = 0.10", "tax.rate"),
        ('rate = "0.10"', 'rate = "ten"', "tax.rate"),
        ("prices_include_tax = true", 'prices_include_tax = "yes"', "tax.prices_include_tax"),
        ('currency = "JPY"', 'currency = "yen"', "currency"),
        ('effective_from = "2019-10-01"', 'effective_from = "2019-13-01"', "effective_from"),
        ("standard_host_metrics = 200", "standard_host_metrics = 0",
         "limits.standard_host_metrics"),
        ("free_plan_hosts = 5", "# free_plan_hosts = 5", "limits.free_plan_hosts"),
        ("anomaly_detection_hosts_per_unit = 5", "# anomaly_detection_hosts_per_unit = 5",
         "limits.anomaly_detection_hosts_per_unit"),
    ],
)
def test_invalid_fields_are_named(tmp_path: Path, old: str, new: str, field: str) -> None:
    assert old in SHIPPED
    path = tmp_path / "bad.toml"
    path.write_text(SHIPPED.replace(old, new))
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(path) in str(info.value) and field in str(info.value)
    assert info.value.context["field"] == field


def test_not_toml_and_empty_folder(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("version = ")
    with pytest.raises(CatalogError, match="not valid TOML"):
        load_catalog(path)
    with pytest.raises(CatalogError, match="no catalog files"):
        load_catalogs(tmp_path / "nothing")
