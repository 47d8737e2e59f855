"""The ``.hdd`` bundle: a directory holding DiskDescriptor.xml and the
images it names (spec: qemu/qemu docs/interop/prl-xml.txt).

The descriptor is parsed hostile-safe, with expat and no more: at most
`MAX_XML_BYTES`, no document type declaration (so no entity is ever
defined, let alone expanded, and nothing external is fetched), a bounded
depth and element count.  From it come the disk size, the one storage
(split images are refused), its images (GUID, Type ``Plain`` or
``Compressed``, File) and the snapshot tree, walked from the top snapshot
(TopGUID, else the predefined top GUID) to the root, each GUID at most
once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from xml.parsers import expat

from imgfs.errors import InvalidImage, Unsupported

DESCRIPTOR = "DiskDescriptor.xml"
MAX_XML_BYTES = 1024 * 1024
MAX_DEPTH = 16
MAX_ELEMENTS = 20000
ROOT_PARENT = "{00000000-0000-0000-0000-000000000000}"
DEFAULT_TOP = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
PLAIN, COMPRESSED = "Plain", "Compressed"


def probe_directory(path: str) -> str | None:
    """A bundle directory opens through its descriptor."""
    descriptor = os.path.join(path, DESCRIPTOR)
    return descriptor if os.path.isfile(descriptor) else None


def looks_like_descriptor(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<?xml"):
        text = text[text.find(b"?>") + 2:].lstrip(b" \t\r\n") if b"?>" in text else b""
    return text.startswith(b"<Parallels_disk_image")


def probe_descriptor(head: bytes, filename: str) -> int:
    """The root element; or any markup in a file of the descriptor's name
    (a bundle named by its directory), which the parser then judges."""
    if looks_like_descriptor(head):
        return 100
    named = os.path.basename(filename) == DESCRIPTOR
    return 100 if named and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<") else 0


# -- a small, refusing XML reader ---------------------------------------------------------------

@dataclass
class Element:
    tag: str
    text: str = ""
    children: list[Element] = field(default_factory=list)

    def all(self, tag: str) -> list[Element]:
        return [child for child in self.children if child.tag == tag]

    def one(self, tag: str) -> Element:
        found = self.all(tag)
        if len(found) != 1:
            raise InvalidImage(f"{DESCRIPTOR}: expected one <{tag}> in <{self.tag}>, found "
                               f"{len(found)}")
        return found[0]

    def value(self, tag: str) -> str:
        return self.one(tag).text.strip()

    def number(self, tag: str, limit: int = 1 << 63) -> int:
        text = self.value(tag)
        if not text.isdigit() or len(text) > 20 or int(text) > limit:
            raise InvalidImage(f"{DESCRIPTOR}: <{tag}> is not a number up to {limit}: "
                               f"{text[:40]!r}")
        return int(text)


def _refuse_declarations(*args: object) -> None:
    raise InvalidImage(f"{DESCRIPTOR}: document type and entity declarations are refused")


def parse_xml(raw: bytes) -> Element:
    """The element tree of `raw`, or InvalidImage."""
    if len(raw) > MAX_XML_BYTES:
        raise InvalidImage(f"{DESCRIPTOR} is larger than {MAX_XML_BYTES} bytes")
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse_declarations
    parser.EntityDeclHandler = _refuse_declarations
    stack: list[Element] = [Element("")]
    count = 0

    def start(tag: str, attributes: dict[str, str]) -> None:
        nonlocal count
        count += 1
        if len(stack) > MAX_DEPTH or count > MAX_ELEMENTS:
            raise InvalidImage(f"{DESCRIPTOR} nests deeper than {MAX_DEPTH} or holds more "
                               f"than {MAX_ELEMENTS} elements")
        element = Element(tag)
        stack[-1].children.append(element)
        stack.append(element)

    def end(tag: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        if len(stack) > 1:
            stack[-1].text += data

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(raw, True)
    except expat.ExpatError as exc:
        raise InvalidImage(f"{DESCRIPTOR} is not well-formed XML ({exc})") from None
    return stack[0].one("Parallels_disk_image")


# -- the descriptor ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Layer:
    """One image of the snapshot chain, top first."""

    guid: str
    kind: str                   # Plain or Compressed
    filename: str
    parent: str | None          # the next layer's GUID; None for the root


@dataclass(frozen=True, slots=True)
class Descriptor:
    disk_sectors: int
    block_sectors: int
    #: GUID -> layer, and the top layer's GUID
    layers: dict[str, Layer]
    top: str


def _images(storage: Element) -> dict[str, tuple[str, str]]:
    images: dict[str, tuple[str, str]] = {}
    for image in storage.all("Image"):
        guid, kind, filename = image.value("GUID"), image.value("Type"), image.value("File")
        if kind not in (PLAIN, COMPRESSED):
            raise InvalidImage(f"{DESCRIPTOR}: image {guid} has unknown Type {kind[:40]!r}")
        if not filename or "\0" in filename:
            raise InvalidImage(f"{DESCRIPTOR}: image {guid} names no valid file")
        images[guid.lower()] = (kind, filename)
    return images


def _parents(snapshots: Element) -> dict[str, str]:
    parents: dict[str, str] = {}
    for shot in snapshots.all("Shot"):
        parents[shot.value("GUID").lower()] = shot.value("ParentGUID").lower()
    return parents


def parse_descriptor(raw: bytes) -> Descriptor:
    root = parse_xml(raw)
    parameters = root.one("Disk_Parameters")
    disk_sectors = parameters.number("Disk_size")
    if parameters.number("Padding") != 0:
        raise Unsupported(f"{DESCRIPTOR}: Padding other than 0 is not supported")
    storages = root.one("StorageData").all("Storage")
    if len(storages) != 1:
        raise Unsupported(f"{DESCRIPTOR}: {len(storages)} storages (split images are not "
                          "supported)")
    storage = storages[0]
    if storage.number("Start") != 0 or storage.number("End") != disk_sectors:
        raise Unsupported(f"{DESCRIPTOR}: a storage that does not cover the whole disk is "
                          "not supported")
    images = _images(storage)
    snapshots = root.one("Snapshots")
    parents = _parents(snapshots)
    tops = snapshots.all("TopGUID")
    top = tops[0].text.strip().lower() if tops else DEFAULT_TOP
    layers: dict[str, Layer] = {}
    guid: str | None = top
    while guid is not None:
        if guid in layers:
            raise InvalidImage(f"{DESCRIPTOR}: the snapshot tree loops at {guid}")
        if guid not in images or guid not in parents:
            raise InvalidImage(f"{DESCRIPTOR}: snapshot {guid} has no image or no Shot")
        parent: str | None = parents[guid]
        if parent == ROOT_PARENT:
            parent = None
        kind, filename = images[guid]
        if kind == PLAIN and parent is not None:
            raise InvalidImage(f"{DESCRIPTOR}: overlay {guid} is Plain (overlays are "
                               "Compressed)")
        layers[guid] = Layer(guid, kind, filename, parent)
        guid = parent
    return Descriptor(disk_sectors, storage.number("Blocksize", 1 << 32), layers, top)
