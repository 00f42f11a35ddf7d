"""Package metadata and manifest parsing: round-trips, and arbitrary input is a BagError, nothing else."""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.bag import (
    DOCUMENT_FIELDS,
    HOCR,
    METADATA,
    TEXT,
    DocumentField,
    OcrInfo,
    OcrPage,
    PackageMetadata,
    bag_info,
    check_tid_matches,
    manifest,
    original_member,
    parse_manifest,
    payload_members,
)
from protocol.errors import BagError, ProtocolError
from protocol.names import display_name, fold, nfc
from protocol.schemas import TEMPLATES

TID = "0123456789abcdef0123456789abcdef"
META = PackageMetadata(
    tid=TID, device_id="xa-tan-trao-01", seq=5, original_name="Công văn số 5 – Tuyên Quang.pdf",
    original_sha256="ab" * 32, original_size=123456, media_type="application/pdf", pages=3,
    captured_at="2024-11-25T07:00:00Z",
    ocr=OcrInfo(engine="tesseract 5.3", languages=("vie",), dpi=300, seconds=1.9, mean_confidence=91.5),
    extra={"phòng": "Văn thư"})


def test_metadata_round_trip() -> None:
    assert PackageMetadata.from_json(META.to_json()) == META
    assert "Tuyên Quang".encode() in META.to_json()   # UTF-8, not \\u escapes


@pytest.mark.parametrize("change", [
    {"seq": "5"}, {"seq": -1}, {"seq": True}, {"pages": 1.5}, {"original_size": "1"},
    {"original_sha256": "AB" * 32}, {"original_sha256": "zz" * 32}, {"tid": "x"}, {"tid": 5},
    {"device_id": "Xã"}, {"media_type": "text/html"}, {"format": "other/1"}, {"extra": {"a": 1}},
    {"extra": []}, {"original_name": "a/b.pdf"}, {"original_name": 7}, {"unknown": 1},
    {"ocr": {"engine": "t", "languages": "vie", "dpi": 300, "seconds": 1}},
    {"ocr": {"engine": "t", "languages": ["vie"], "dpi": "300", "seconds": 1}},
    {"ocr": "tesseract"}, {"ocr": None},
    # Unbounded or nonsense values a hostile box sent, which central catalogued and served back.
    {"captured_at": "../../etc/passwd<script>"}, {"captured_at": "2024-11-25T07:00:00Z" + " " * 200_000},
    {"extra": {f"k{n}": "v" for n in range(33)}}, {"extra": {"ghi chú": "x" * 1_000_000}},
    {"pages": 10**12},
    {"ocr": {"engine": "t" * 500_000, "languages": ["vie"], "dpi": 300, "seconds": 1}},
    {"ocr": {"engine": "t", "languages": ["vie"], "dpi": -5, "seconds": 1}},
    {"ocr": {"engine": "t", "languages": ["vie"], "dpi": 300, "seconds": 1, "mean_confidence": float("nan")}},
    {"ocr": {"engine": "t", "languages": ["vie"] * 100, "dpi": 300, "seconds": 1}},
])
def test_bad_metadata_is_a_bag_error(change: dict[str, object]) -> None:
    obj = {**json.loads(META.to_json()), **change}
    with pytest.raises(BagError):
        PackageMetadata.from_json(json.dumps(obj).encode())


def test_deeply_nested_metadata_is_a_bag_error() -> None:
    with pytest.raises(BagError):
        PackageMetadata.from_json(b"[" * 100000)


def test_manifest_round_trip_and_closed_member_set() -> None:
    hashes = {METADATA: "a" * 64, TEXT: "b" * 64, HOCR: "c" * 64, original_member("image/png"): "d" * 64}
    assert parse_manifest(manifest(hashes), "image/png") == hashes
    assert parse_manifest(manifest(hashes)) == hashes
    with pytest.raises(BagError):
        parse_manifest(manifest(hashes), "application/pdf")
    assert set(payload_members("image/png")) == set(hashes)


@pytest.mark.parametrize("data", [
    b"x" * 64 + b"  data/text.txt\n", b"A" * 64 + b"  data/text.txt\n", b"a" * 63 + b"  data/text.txt\n",
    b"a" * 64 + b" data/text.txt\n", b"a" * 64 + b"  data/../etc/passwd\n", b"a" * 64 + b"  data/evil\n",
    b"a" * 64 + b"  data/text.txt\n" + b"b" * 64 + b"  data/text.txt\n", b"a" * 64 + b"  data/text.txt",
    b"a" * 64 + b"  data/text.txt\x1c\n", b"\xff\n", b"\n",
])
def test_bad_manifests(data: bytes) -> None:
    with pytest.raises(BagError):
        parse_manifest(data)


def test_original_member_and_bag_info() -> None:
    with pytest.raises(BagError):
        original_member("text/html")
    info = bag_info(device_id="xa-1", tid=TID, bagging_date="2024-11-25", payload_bytes=10, payload_files=4)
    assert b"Payload-Oxum: 10.4" in info
    check_tid_matches(META, TID, "xa-tan-trao-01")
    with pytest.raises(BagError):
        check_tid_matches(META, TID, "xa-khac")


def test_names() -> None:
    decomposed = unicodedata.normalize("NFD", "Công văn số 5 – Tuyên Quang.pdf")
    assert display_name(decomposed) == "Công văn số 5 – Tuyên Quang.pdf"
    assert nfc(decomposed) == display_name(decomposed)
    assert "/" not in display_name("../../etc/passwd") and "\\" not in display_name("a\\b")
    assert display_name("") == "unnamed"
    long = display_name("Đ" * 400 + ".pdf")
    assert len(long) <= 255 and long.endswith(".pdf")
    assert fold("Quyết định Đông") == "quyet dinh dong"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.dictionaries(st.sampled_from(list(json.loads(META.to_json()))),
                                 st.none() | st.integers() | st.text(max_size=10) | st.booleans()
                                 | st.lists(st.text(max_size=5), max_size=3), max_size=14)
                 .map(lambda d: json.dumps({**json.loads(META.to_json()), **d}).encode())))
def test_metadata_from_json_never_crashes(data: bytes) -> None:
    try:
        meta = PackageMetadata.from_json(data)
    except BagError:
        return
    assert PackageMetadata.from_json(meta.to_json()) == meta


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.lists(st.tuples(st.text("0123456789abcdefA", min_size=63, max_size=65),
                                    st.sampled_from(["  ", " ", "\t"]),
                                    st.sampled_from([METADATA, TEXT, HOCR, "data/original.pdf", "data/x", "",
                                                     "bagit.txt"])), max_size=5)
                 .map(lambda lines: "".join(f"{d}{s}{n}\n" for d, s, n in lines).encode())),
       st.sampled_from([None, "application/pdf", "image/png"]))
def test_parse_manifest_never_crashes(data: bytes, media_type: str | None) -> None:
    try:
        result = parse_manifest(data, media_type)
    except ProtocolError as exc:
        assert isinstance(exc, BagError)
        return
    assert parse_manifest(manifest(result), media_type) == result


RICH = PackageMetadata(
    tid=TID, device_id="xa-tan-trao-01", seq=6, original_name="Quyết định 125.jpg",
    original_sha256="cd" * 32, original_size=5000, media_type="image/jpeg", pages=1,
    captured_at="2026-11-30T07:00:00Z",
    ocr=OcrInfo(engine="tesseract 5.3.0", languages=("vie",), dpi=253, seconds=2.5, mean_confidence=94.1,
                dpi_estimated=True,
                page_info=(OcrPage(dpi=253, dpi_estimated=True, rotation=180, skew=-1.2,
                                   orientation_confidence=11.5, width=1654, height=2339),)),
    document={"so_ky_hieu": DocumentField("125/QĐ-UBND", 0.95), "ngay": DocumentField("2025-03-14", 0.9),
              "loai": DocumentField("Quyết định", 0.97),
              "nguoi_ky": DocumentField("Nguyễn Văn Hùng", 0.8)})


def test_extracted_fields_and_page_info_round_trip() -> None:
    assert PackageMetadata.from_json(RICH.to_json()) == RICH
    assert "125/QĐ-UBND".encode() in RICH.to_json()


def test_metadata_written_before_the_fields_existed_still_parses() -> None:
    old = json.loads(META.to_json())
    del old["document"], old["ocr"]["page_info"], old["ocr"]["dpi_estimated"]
    parsed = PackageMetadata.from_json(json.dumps(old).encode())
    assert parsed == META and parsed.document == {} and parsed.ocr.page_info == ()


@pytest.mark.parametrize("change", [
    {"document": {"so_ky_hieu": {"value": "1/QĐ", "confidence": 1.5}}},
    {"document": {"so_ky_hieu": {"value": "", "confidence": 0.5}}},
    {"document": {"so_ky_hieu": {"value": "1/QĐ", "confidence": True}}},
    {"document": {"so_ky_hieu": {"value": "1/QĐ", "confidence": 0.5, "by": "x"}}},
    {"document": {"ngay": {"value": "14/3/2025", "confidence": 0.5}}},
    {"document": {"ngay": {"value": "2025-13-01", "confidence": 0.5}}},
    {"document": {"tac_gia": {"value": "x", "confidence": 0.5}}},
    {"document": {"loai": {"value": unicodedata.normalize("NFD", "Quyết định"), "confidence": 0.5}}},
    {"document": {"loai": {"value": "Quyết\u202eđịnh", "confidence": 0.5}}},
    {"document": {"loai": {"value": "x" * 3000, "confidence": 0.5}}},
    {"document": {"loai": "Quyết định"}}, {"document": []},
])
def test_bad_document_fields_are_bag_errors(change: dict[str, object]) -> None:
    obj = {**json.loads(RICH.to_json()), **change}
    with pytest.raises(BagError):
        PackageMetadata.from_json(json.dumps(obj).encode())


@pytest.mark.parametrize("page", [
    {"dpi": -1}, {"dpi": "300"}, {"dpi": 300, "rotation": 45}, {"dpi": 300, "skew": 90},
    {"dpi": 300, "skew": float("nan")}, {"dpi": 300, "dpi_estimated": 1}, {"dpi": 300, "width": -5},
    {"dpi": 300, "colour": "red"}, {},
])
def test_bad_page_info_is_a_bag_error(page: dict[str, object]) -> None:
    obj = json.loads(RICH.to_json())
    obj["ocr"]["page_info"] = [page]
    with pytest.raises(BagError):
        PackageMetadata.from_json(json.dumps(obj).encode())


def test_templates_map_only_onto_extracted_fields() -> None:
    for template in TEMPLATES.values():
        keys = [f.key for f in template.fields]
        assert len(keys) == len(set(keys)) and not template.verified
        assert {f.extracted for f in template.fields if f.extracted} == set(DOCUMENT_FIELDS)
