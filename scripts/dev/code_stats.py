"""Structure figures of one crate's source: lines per file, the largest functions, and the
module graph read from `crate::` paths (imports of an enclosing module, "upward", and cycles
between files).

usage: code_stats.py CRATE_SRC_DIR [--top N]

A file's module is its path (`src/engine/tract.rs` is `engine::tract`, `mod.rs` and `lib.rs`
the folder's). A `crate::a::b::c` path names the deepest module of the crate that it starts
with; an import of a module that encloses the importing one (the crate root included) is
upward. Test files (`tests.rs`, `tests/`) and `#[cfg(test)]` modules are left out of the graph.
"""
import argparse
import os
import re
import sys

ap = argparse.ArgumentParser()
ap.add_argument("src")
ap.add_argument("--top", type=int, default=5)
a = ap.parse_args()

files = {}
for dirpath, _, names in os.walk(a.src):
    for n in names:
        if n.endswith(".rs"):
            p = os.path.join(dirpath, n)
            files[os.path.relpath(p, a.src)] = open(p, encoding="utf-8").read()


def module_of(rel):
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


modules = {}
for f in sorted(files, key=lambda r: r.endswith("main.rs")):
    modules.setdefault(module_of(f), f)


def is_test(rel):
    return rel.endswith("tests.rs") or f"{os.sep}tests{os.sep}" in rel or rel.startswith("tests" + os.sep)


def strip(text):
    """The text without comments, string and character literals and `#[cfg(test)]` modules."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == "r" and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")) and \
                re.match(r'r#*"', text[i:]):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            j = text.find('"' + hashes, i + len(hashes) + 2)
            out.append('""')
            i = n if j < 0 else j + 1 + len(hashes)
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif c == "'" and re.match(r"'(\\.[^']*|[^'\\\n])'", text[i:]):
            m = re.match(r"'(\\.[^']*|[^'\\\n])'", text[i:])
            out.append("' '")
            i += m.end()
        else:
            out.append(c)
            i += 1
    text = "".join(out)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        out.append(text[i:m.start()])
        i = j
    out.append(text[i:])
    return "".join(out)


# Lines per file.
print(f"## lines per file ({a.src})")
total = 0
for rel in sorted(files, key=lambda r: -files[r].count("\n")):
    n = files[rel].count("\n")
    total += n
    print(f"{n:6} {rel}")
print(f"{total:6} total, {len(files)} files; largest {max(files[r].count(chr(10)) for r in files)}")

# Largest functions.
fns = []
for rel, text in files.items():
    clean = strip(text) if not is_test(rel) else None
    if clean is None:
        continue
    for m in re.finditer(r"\bfn\s+(\w+)[^;{]*\{", clean):
        depth, j = 1, m.end()
        while j < len(clean) and depth:
            depth += {"{": 1, "}": -1}.get(clean[j], 0)
            j += 1
        lines = clean[m.start():j].count("\n") + 1
        fns.append((lines, f"{rel}::{m.group(1)}"))
fns.sort(reverse=True)
print(f"\n## largest functions (non-test code)")
for lines, name in fns[: a.top]:
    print(f"{lines:6} {name}")

# The module graph.
edges = set()
upward = []
for rel, text in files.items():
    if is_test(rel):
        continue
    me = module_of(rel)
    clean = strip(text)
    paths = re.findall(r"\bcrate((?:::\w+)+)", clean)
    paths += [m for m in re.findall(r"\buse\s+crate::\{([^}]*)\}", clean)]
    # `use super::x` in a file: the parent module's item.
    for m in re.findall(r"\bsuper((?:::\w+)+)", clean):
        parent = me[:-1] if not rel.endswith(("mod.rs", "lib.rs")) else me[:-1]
        paths.append("::" + "::".join(parent + tuple(m.strip(":").split("::"))))
    for p in paths:
        segs = tuple(s for s in re.split(r"::|,|\s+", p) if s)
        target = ()
        for k in range(len(segs), 0, -1):
            if segs[:k] in modules:
                target = segs[:k]
                break
        if target == me or is_test(modules.get(target, "")):
            continue
        if me[: len(target)] == target:
            upward.append((rel, modules[target], "::".join(segs)))
        edges.add((rel, modules[target]))

pairs = {}
for rel, to, path in upward:
    pairs.setdefault((rel, to), set()).add("crate::" + path)
print(f"\n## upward imports: {len(pairs)} (importing file -> enclosing module's file)")
for (rel, to), names in sorted(pairs.items()):
    print(f"  {rel} -> {to}: {', '.join(sorted(names))}")

# Cycles: strongly connected components of more than one file.
graph = {}
for x, y in edges:
    graph.setdefault(x, set()).add(y)
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))


for v in list(graph):
    if v not in index:
        visit(v)
print(f"\n## cycles: {len(sccs)}")
for c in sccs:
    print("  " + " <-> ".join(c))
