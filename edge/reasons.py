"""Why a scan was refused, in words a commune clerk reads: Vietnamese first, English below.

Every refusal carries a ``code``; this table turns it into what happened and what to do. The
technical detail (the exact error) is kept beside it for the administrator, never instead of it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Explanation:
    what_vi: str
    todo_vi: str
    what_en: str
    todo_en: str


_RETRY_VI = "Sau khi sửa, chép tệp trở lại thư mục quét (hoặc chạy: sohoa edge retry TÊN_TỆP)."
_RETRY_EN = "Once fixed, copy the file back into the scan folder (or run: sohoa edge retry NAME)."

EXPLANATIONS: dict[str, Explanation] = {
    "not_a_scan": Explanation(
        "Tệp không phải là bản quét PDF, JPEG, PNG hoặc TIFF.",
        "Quét lại tài liệu và lưu dưới dạng PDF hoặc JPEG.",
        "The file is not a PDF, JPEG, PNG or TIFF scan.", "Scan the document again as PDF or JPEG."),
    "empty": Explanation(
        "Tệp rỗng (0 byte): bản quét chưa hoàn tất.", "Quét lại tài liệu.",
        "The file is empty (0 bytes): the scan did not complete.", "Scan the document again."),
    "damaged": Explanation(
        "Tệp bị hỏng hoặc bị cắt cụt, không đọc được.", "Quét lại tài liệu.",
        "The file is damaged or truncated and cannot be read.", "Scan the document again."),
    "incomplete": Explanation(
        "Tệp chưa được ghi xong và đã lâu không thay đổi (máy quét dừng giữa chừng?).",
        "Kiểm tra máy quét rồi quét lại tài liệu.",
        "The file was never finished and has not changed for a long time (did the scanner stop?).",
        "Check the scanner and scan the document again."),
    "encrypted": Explanation(
        "Tệp PDF có đặt mật khẩu.", "Lưu lại bản quét không đặt mật khẩu.",
        "The PDF is password-protected.", "Save the scan again without a password."),
    "too_large": Explanation(
        "Tệp hoặc trang quá lớn để hộp xử lý.",
        "Quét ở độ phân giải 200–300 dpi, hoặc chia tài liệu thành nhiều tệp.",
        "The file or a page is too large for the box to process.",
        "Scan at 200–300 dpi, or split the document into several files."),
    "not_a_file": Explanation(
        "Đây là lối tắt (liên kết) hoặc tệp đặc biệt, không phải bản quét.",
        "Chép chính tệp bản quét vào thư mục quét.",
        "This is a shortcut (link) or a special file, not a scan.",
        "Copy the scan file itself into the scan folder."),
    "central_refused": Explanation(
        "Kho lưu trữ trung tâm đã từ chối tài liệu này.",
        "Báo cho cán bộ quản trị; có thể thử lại sau.",
        "The central archive refused this document.", "Tell the administrator; it can be retried."),
    "identity_clash": Explanation(
        "Một hộp khác đang dùng cùng danh tính với hộp này (thẻ nhớ bị sao chép?). "
        "Tài liệu chưa được gửi.",
        "Báo ngay cho cán bộ quản trị. Sau khi hộp được đăng ký lại, chạy: sohoa edge retry --all.",
        "Another box is using this box's identity (a copied memory card?). The document was not sent.",
        "Tell the administrator now. Once the box is enrolled again, run: sohoa edge retry --all."),
    "re_enrolled": Explanation(
        "Hộp đã được đăng ký lại (danh tính cũ bị thu hồi) trước khi tài liệu này được gửi; "
        "kho lưu trữ trung tâm chưa nhận được nó.",
        "Chạy: sohoa edge retry --all (hoặc chép tệp trở lại thư mục quét) để gửi lại.",
        "The box was enrolled again (its old identity revoked) before this document was sent; "
        "the central archive does not have it.",
        "Run: sohoa edge retry --all (or copy the file back into the scan folder) to send it."),
    "gave_up": Explanation(
        "Hộp đã thử xử lý tài liệu này nhiều lần nhưng không thành công.",
        "Thử lại; nếu vẫn lỗi, báo cho cán bộ quản trị.",
        "The box tried to process this document several times and failed.",
        "Retry it; if it fails again, tell the administrator."),
    "envelope_unreadable": Explanation(
        "Bản đóng gói đã mã hóa của tài liệu bị hỏng trên hộp (lỗi thẻ nhớ?).",
        "Thử lại; nếu lặp lại, báo cho cán bộ quản trị kiểm tra thẻ nhớ.",
        "The box's encrypted package of this document is damaged (a memory card fault?).",
        "Retry it; if it happens again, ask the administrator to check the memory card."),
}

_FALLBACK = Explanation(
    "Tài liệu chưa được lưu trữ.", "Báo cho cán bộ quản trị.",
    "The document was not archived.", "Tell the administrator.")


def classify(reason: str) -> str:
    """The refusal code for a reason text raised without one (older raisers)."""
    text = reason.lower()
    rules = (
        ("password", "encrypted"), ("encrypted", "encrypted"), ("empty", "empty"),
        ("symbolic link", "not_a_file"), ("fifo", "not_a_file"), ("device, socket", "not_a_file"),
        ("not a png, jpeg", "not_a_scan"), ("above the limit", "too_large"), ("too large", "too_large"),
        ("decompression bomb", "too_large"), ("pixels", "too_large"), ("more memory", "too_large"),
        ("larger than any paper", "too_large"), ("took longer than", "too_large"),
    )
    return next((code for needle, code in rules if needle in text), "damaged")


def explain(code: str | None) -> Explanation:
    return EXPLANATIONS.get(code or "", _FALLBACK)


def note_text(*, name: str, code: str | None, detail: str, when: str, tid: str | None = None) -> str:
    """The reason file a clerk opens beside a refused scan."""
    why = explain(code)
    detail = " ".join(detail.split())
    lines = [
        f"Tệp: {name}",
        f"Lý do: {why.what_vi}",
        f"Cách xử lý: {why.todo_vi}",
        _RETRY_VI,
        "",
        f"File: {name}",
        f"Reason: {why.what_en}",
        f"What to do: {why.todo_en}",
        _RETRY_EN,
        "",
        f"reason: {detail}",
        f"code: {code or 'unknown'}",
        f"when: {when}",
    ]
    if tid:
        lines.append(f"tid: {tid}")
    return "\n".join(lines) + "\n"
