"""What goes up beside an export file: a zip of it, and the provider's map file.

Acoustic's batch import reads a CSV together with an XML map file (``LIST_IMPORT``: the action, the list, the
sync field, whether the file has a header row, and the column mapping); the map is uploaded after its data
file, because its arrival is what starts the import.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from xml.etree import ElementTree

from batchsync.config import Profile
from batchsync.engine.build import written_columns

SYNC_FIELD = "EMAIL"


def package(profile: Profile, list_code: str, data: Path, action: str) -> list[Path]:
    """The files to upload for one data file, in upload order (data first, map last)."""
    files = [zip_file(data) if profile.export.zip else data]
    if profile.export.map_file == "acoustic":
        files.append(acoustic_map(profile, list_code, files[0], action))
    return files


def zip_file(data: Path) -> Path:
    target = data.with_name(data.name + ".zip")
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.write(data, arcname=data.name)
    data.unlink()
    return target


def acoustic_map(profile: Profile, list_code: str, data: Path, action: str) -> Path:
    """LIST_IMPORT map: ``action`` is ADD_AND_UPDATE for the data file, OPT_OUT for the opt-out file."""
    root = ElementTree.Element("LIST_IMPORT")
    info = ElementTree.SubElement(root, "LIST_INFO")
    for tag, text in (
        ("ACTION", action),
        ("LIST_ID", profile.lists[list_code].id),
        ("FILE_TYPE", "0"),
        ("HASHEADERS", "true"),
    ):
        ElementTree.SubElement(info, tag).text = text
    sync = ElementTree.SubElement(ElementTree.SubElement(root, "SYNC_FIELDS"), "SYNC_FIELD")
    ElementTree.SubElement(sync, "NAME").text = SYNC_FIELD
    mapping = ElementTree.SubElement(root, "MAPPING")
    for index, column in enumerate(written_columns(profile), start=1):
        entry = ElementTree.SubElement(mapping, "COLUMN")
        ElementTree.SubElement(entry, "INDEX").text = str(index)
        ElementTree.SubElement(entry, "NAME").text = column.header
        ElementTree.SubElement(entry, "INCLUDE").text = "true"
    # The data file's name without its extensions (.csv, .csv.zip), whatever dots the profile's name holds: the
    # data and opt-out files each get a map of their own, never one for both.
    target = data.with_name(data.name.removesuffix(".zip").rsplit(".", 1)[0] + ".xml")
    ElementTree.ElementTree(root).write(target, encoding="utf-8", xml_declaration=True)
    return target
