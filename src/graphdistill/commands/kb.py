"""`graphdistill kb build|query`: build the knowledge base (default COCO facts or your JSONL) and query it."""

from __future__ import annotations

import argparse
from typing import Any

from graphdistill.commands._common import CommandError, console, print_json


def _add_location(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--path", help="local Chroma folder (default: $GRAPHDISTILL_HOME/kb/chroma)")
    where.add_argument("--url", help="a Chroma server instead, e.g. http://localhost:8000")
    p.add_argument("--collection", default="coco_facts", help="collection name (default: coco_facts)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("kb", help="build and query the knowledge base the teacher graph retrieves from")
    ksub = p.add_subparsers(dest="kb_command", metavar="ACTION")
    ksub.required = True
    b = ksub.add_parser("build", help="ingest the default COCO facts, or a JSONL file of {id, text[, label]}")
    _add_location(b)
    b.add_argument("--jsonl", help="your own knowledge: one JSON object per line with id, text[, label]")
    b.add_argument("--force", action="store_true", help="re-ingest even when every id is already stored")
    b.set_defaults(func=_build)
    q = ksub.add_parser("query", help="the documents nearest to a text")
    q.add_argument("text", help="what to look for")
    q.add_argument("-k", type=int, default=3, help="how many documents (default: 3)")
    _add_location(q)
    q.set_defaults(func=_query)


def _open(args: argparse.Namespace) -> Any:
    from graphdistill.errors import GraphdistillError
    from graphdistill.teachers.retriever import ChromaRetriever

    try:
        return ChromaRetriever(path=args.path, url=args.url, collection=args.collection)
    except GraphdistillError:  # RetrieverError: already names what is wrong
        raise
    except Exception as exc:  # chromadb raises its own types for an unreachable server or a bad folder
        where = args.url or args.path or "the default knowledge-base folder"
        raise CommandError(f"cannot open the knowledge base at {where}: {exc}") from exc


def _build(args: argparse.Namespace) -> int:
    from graphdistill.teachers.knowledge import default_documents, load_jsonl

    # read and validate every row before touching the store: a bad file changes nothing
    docs = load_jsonl(args.jsonl) if args.jsonl else default_documents()
    source = args.jsonl or "default COCO facts"
    con = console(stderr=True)
    with con.status("loading the text embedder and the knowledge base"):
        retriever = _open(args)
    from graphdistill.commands._common import stage_progress
    from graphdistill.teachers.knowledge import ingest_documents

    with stage_progress(con) as tick:
        counts = ingest_documents(
            retriever, docs, force=args.force, progress=lambda done, total: tick("ingesting", done, total)
        )
    result = {
        "source": source,
        "location": retriever.location,
        "collection": retriever.collection_name,
        **counts,
        "embedder": retriever.text_embedder.model_id,
    }
    if args.json:
        print_json(result)
    else:
        console().print(
            f"{result['ingested']} of {len(docs)} documents from {source} ingested "
            f"({result['skipped_already_present']} already present); "
            f"{result['total_documents']} in {retriever.collection_name!r} at {retriever.location}"
        )
    return 0


def _query(args: argparse.Namespace) -> int:

    if args.k < 1:
        raise CommandError(f"-k must be >= 1, got {args.k}")
    if not args.text.strip():
        raise CommandError("the query text is empty")
    con = console(stderr=True)
    with con.status("loading the text embedder and the knowledge base"):
        retriever = _open(args)
    docs = retriever.query(args.text, k=args.k)
    if args.json:
        print_json([d.model_dump() for d in docs])
        return 0
    out = console()
    for d in docs:
        out.print(f"[bold]{d.id}[/]  distance {d.distance:.3f}\n  {d.text}")
    return 0
