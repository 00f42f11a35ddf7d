"""The archival metadata templates for a "văn bản" (one document), as versioned data.

PROVISIONAL: the official texts of Thông tư 02/2019/TT-BNV (Annex I, input information for
digitised archival documents) and Thông tư 05/2025/TT-BNV could not be read from this workplace (no
network beyond package registries). The TT 02/2019 field list below is transcribed from memory of
that annex and must be checked against the published text before an archive relies on it; the
TT 05/2025 entry repeats it unchanged until someone with the text does that work. Which fields the
edge extracts is fixed (``protocol.bag.DOCUMENT_FIELDS``); a template maps its fields onto them.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.bag import DOCUMENT_FIELDS


@dataclass(frozen=True, slots=True)
class TemplateField:
    key: str                  # stable column key in exports
    label: str                # the template's own wording
    extracted: str | None     # the DOCUMENT_FIELDS key that fills it, if any

    def __post_init__(self) -> None:
        if self.extracted is not None and self.extracted not in DOCUMENT_FIELDS:
            raise ValueError(f"{self.key}: {self.extracted!r} is not an extracted field")


@dataclass(frozen=True, slots=True)
class Template:
    id: str
    version: int              # bumped whenever the field list changes; exports carry id and version
    title: str
    source: str
    verified: bool            # False: transcribed without access to the official text
    fields: tuple[TemplateField, ...]


_TT02_2019_FIELDS = (
    TemplateField("ma_dinh_danh", "Mã định danh văn bản", None),
    TemplateField("ma_ho_so", "Mã hồ sơ", None),
    TemplateField("so_thu_tu", "Số thứ tự văn bản trong hồ sơ", None),
    TemplateField("ten_loai", "Tên loại văn bản", "loai"),
    TemplateField("so_ky_hieu", "Số và ký hiệu văn bản", "so_ky_hieu"),
    TemplateField("ngay", "Ngày, tháng, năm văn bản", "ngay"),
    TemplateField("co_quan", "Tên cơ quan, tổ chức ban hành văn bản", "co_quan"),
    TemplateField("trich_yeu", "Trích yếu nội dung", "trich_yeu"),
    TemplateField("ngon_ngu", "Ngôn ngữ", None),
    TemplateField("so_trang", "Số lượng trang", None),
    TemplateField("nguoi_ky", "Họ tên người ký", "nguoi_ky"),
    TemplateField("chuc_vu", "Chức vụ người ký", None),
    TemplateField("ky_hieu_thong_tin", "Ký hiệu thông tin", None),
    TemplateField("tu_khoa", "Từ khóa", None),
    TemplateField("che_do_su_dung", "Chế độ sử dụng", None),
    TemplateField("muc_do_tin_cay", "Mức độ tin cậy", None),
    TemplateField("but_tich", "Bút tích", None),
    TemplateField("tinh_trang_vat_ly", "Tình trạng vật lý", None),
    TemplateField("ghi_chu", "Ghi chú", None),
)

# TT 05/2025 governs digitised archives now: exports use it unless another template is asked for.
DEFAULT_TEMPLATE = "tt05-2025"

TEMPLATES = {
    "tt02-2019": Template("tt02-2019", 1, "Thông tư 02/2019/TT-BNV, Phụ lục I (văn bản)",
                          "transcribed from memory; not checked against the published text", False,
                          _TT02_2019_FIELDS),
    "tt05-2025": Template("tt05-2025", 1, "Thông tư 05/2025/TT-BNV (văn bản)",
                          "official text not available here: TT 02/2019's list, unchanged", False,
                          _TT02_2019_FIELDS),
}
