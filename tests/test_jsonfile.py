import pytest

from lorakit.errors import LorakitError
from lorakit.jsonfile import read_json_object


@pytest.mark.parametrize("content, expect", [(b"{oops", "is not valid JSON (JSONDecodeError)"),
                                             (b"\xff\xfe", "is not valid JSON (UnicodeDecodeError)"),
                                             (b"[1, 2]", "is not a JSON object")])
def test_anything_but_a_json_object_is_one_line_naming_the_file(tmp_path, content, expect):
    file = tmp_path / "config.json"
    file.write_bytes(content)
    with pytest.raises(LorakitError, match=rf"^model.name_or_path 'x': {file} {expect.replace('(', '[(]').replace(')', '[)]')}$"):
        read_json_object(file, "model.name_or_path 'x'")


def test_a_missing_file_is_named_and_an_object_is_returned(tmp_path):
    with pytest.raises(LorakitError, match="nothing.json is not valid JSON"):
        read_json_object(tmp_path / "nothing.json", "here")
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json_object(tmp_path / "ok.json", "here") == {"a": 1}
