"""Text for calibration and evaluation: the user's text files, and offline text shipped in packages (English
Wikipedia articles from gensim's test data, ../shared/MODELS.md §3.1)."""
from __future__ import annotations

import bz2
import functools
import importlib.util
import os
import pathlib
import re

from sparsec.errors import SparsecError, UsageError

def read_text_file(path: str, what: str) -> str:
    """The text of a user's UTF-8 file (undecodable bytes replaced); ``what`` names it in errors ("--ppl file")."""
    if not os.path.isfile(path):
        raise UsageError(f"{what} '{path}' does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise UsageError(f"{what} '{path}' is empty; give a text file")
    return text


_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def gensim_test_data() -> pathlib.Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise SparsecError("the built-in Wikipedia text needs the package gensim: pip install 'sparsec[data]'")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


@functools.lru_cache(maxsize=4)
def wiki_articles(min_chars: int = 2000) -> tuple[tuple[str, str], ...]:
    """(title, plain text) of the 93 articles of at least ``min_chars`` characters, in dump order."""
    from xml.etree import ElementTree as ET

    from gensim.corpora.wikicorpus import filter_wiki

    articles = []
    for _, el in ET.iterparse(bz2.open(gensim_test_data() / _WIKI)):
        if not el.tag.endswith("}page"):
            continue
        title, text = el.find("{*}title").text, el.find("{*}revision/{*}text").text or ""
        el.clear()
        if text.lower().startswith("#redirect"):
            continue
        text = re.sub(r"'{2,}", "", filter_wiki(text))
        lines = [line.strip() for line in text.split("\n")]
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(x for x in lines if len(x) > 80 or x == "")).strip()
        if len(text) >= min_chars:
            articles.append((title, text))
    return tuple(articles)


def wiki_sentences(n: int, *, start_article: int = 0, min_words: int = 8, max_words: int = 40) -> list[str]:
    """``n`` sentences of ``min_words``..``max_words`` words from the articles, starting at ``start_article``."""
    out = []
    for _, text in wiki_articles()[start_article:]:
        for sentence in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")):
            if min_words <= len(sentence.split()) <= max_words:
                out.append(sentence)
                if len(out) == n:
                    return out
    return out
