"""Fixtures of the search service tests: the trained tiny project (tests.app.search_project), built
once per session and shared by test_web.py and test_web_browser.py."""

from __future__ import annotations

import pytest

from tests.app.search_project import SearchProject, build_search_project


@pytest.fixture(scope="session")
def search_project(tmp_path_factory) -> SearchProject:
    return build_search_project(tmp_path_factory.mktemp("search"))
