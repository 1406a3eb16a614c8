"""The storage module: schemes, joining, containment, atomic writes, and the one redaction rule on every kind of
secret (userinfo, presigned query parameters, storage options, free text that quotes a secret without its URI)."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipmaps.schemas.storage import (
    REDACTED,
    atomic_put,
    exists,
    filesystem,
    has_glob_characters,
    is_inside,
    is_secret_name,
    join_uri,
    read_bytes,
    redact_error,
    redact_options,
    redact_text,
    redact_uri,
    remove,
    scheme_error,
    secret_values,
    uri_scheme,
    uri_schemes,
    userinfo_error,
    with_io_defaults,
    write_bytes,
    write_table,
)

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfi@CYEXAMPLEKEY"  # an AWS-like secret with '/', '+' and '@'
SIG = "3f1c0ffee5b4d2a9e8c7b6a5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5"
PRESIGNED = (
    "https://bucket.s3.amazonaws.com/images/cat.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z"
    f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLETOKEN&X-Amz-Signature={SIG}"
)


# ------------------------------------------------------------------------------------------------ schemes
def test_uri_scheme():
    assert uri_scheme("/data/x.png") == "file" and uri_scheme("rel/x.png") == "file"
    assert uri_scheme("C:/x.png") == "file" and uri_scheme("C:\\x.png") == "file" and uri_scheme("C://x") == "file"
    assert uri_scheme("S3://b/k") == "s3" and uri_scheme("gs://b/k") == "gs" and uri_scheme("file:///x") == "file"
    assert uri_scheme("s3a://b/k") == "s3a" and uri_scheme("https://h/x") == "https"
    arr = pa.array(["/x", "S3://b/k", None, "gs://b", "C:/x", "http://h/x"])
    assert uri_schemes(arr).to_pylist() == ["file", "s3", None, "gs", "file", "http"]
    assert uri_schemes(pa.chunked_array([arr])).to_pylist() == uri_schemes(arr).to_pylist()


def test_scheme_error_names_the_scheme_and_hides_credentials():
    assert scheme_error("s3://b/k", ["file", "S3"]) is None and scheme_error("/x", ["file"]) is None
    assert scheme_error("s3a://b/k", ["s3"]) == "URI scheme 's3a' of s3a://b/k is not allowed (allowed: s3)"
    message = scheme_error(f"http://user:{SECRET}@h/x.png", ("s3", "file"))
    assert message == "URI scheme 'http' of http://***@h/x.png is not allowed (allowed: file, s3)"
    assert SIG not in scheme_error(PRESIGNED, ["s3"])


# ------------------------------------------------------------------------------------------------ locations
def test_join_uri():
    assert join_uri("s3://b/root/", "/images/a.png") == "s3://b/root/images/a.png"
    assert join_uri("s3://b/root", "index", "ids.parquet") == "s3://b/root/index/ids.parquet"
    assert join_uri("/data", "sub\\a.png") == "/data/sub/a.png" and join_uri("", "a.png") == "a.png"
    assert join_uri("/", "a.png") == "/a.png" and join_uri("s3://b/x", "") == "s3://b/x"


def test_is_inside(tmp_path):
    assert is_inside("s3://b/out/labels", "s3://b/out") and is_inside("s3://b/out", "s3://b/out/")
    assert not is_inside("s3://b/output", "s3://b/out") and not is_inside("s3://c/out", "s3://b/out")
    assert is_inside("s3a://b/out/x", "s3://b") and is_inside("gcs://b/x", "gs://b")
    assert is_inside(f"s3://AKIA:{SECRET}@b/out/x", "s3://b/out") and is_inside("s3://b/out?versionId=2", "s3://b")
    assert is_inside(str(tmp_path / "a" / ".." / "a" / "x"), f"file://{tmp_path}/a")
    assert not is_inside(str(tmp_path), str(tmp_path / "a")) and not is_inside("s3://b/x", str(tmp_path))


# ------------------------------------------------------------------------------------------------ redaction
@pytest.mark.parametrize(
    "uri, expected",
    [
        (f"s3://AKIAEXAMPLE:{SECRET}@bucket/k.jpg", "s3://***@bucket/k.jpg"),
        ("s3://AKIA:se/cr/et@bucket/k.jpg", "s3://***@bucket/k.jpg"),
        ("s3://k:p@ss@bucket/x", "s3://***@bucket/x"),
        ("s3://token123@bucket/x", "s3://***@bucket/x"),
        ("gs://user:a+b/c@bucket/x?generation=5", "gs://***@bucket/x?generation=5"),
        ("s3://bucket/me@example.com/k.jpg", "s3://bucket/me@example.com/k.jpg"),
        ("s3://bucket/key@v2/x?versionId=a@b", "s3://bucket/key@v2/x?versionId=a@b"),
        ("/local/path/a@b:c", "/local/path/a@b:c"),
        ("https://h/x?token=abc&a=1#frag", "https://h/x?token=***&a=1#frag"),
        (
            "https://acct.blob.core.windows.net/c/x.png?sv=2022-11-02&se=2030-01-01&sr=b&sp=r&sig=AbC%2Bd%3D",
            "https://acct.blob.core.windows.net/c/x.png?sv=2022-11-02&se=2030-01-01&sr=b&sp=r&sig=***",
        ),
        (
            "https://storage.googleapis.com/b/x.png?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p.iam"
            "&X-Goog-Date=20240101T000000Z&X-Goog-SignedHeaders=host&X-Goog-Signature=0a1b2c",
            "https://storage.googleapis.com/b/x.png?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=***"
            "&X-Goog-Date=20240101T000000Z&X-Goog-SignedHeaders=host&X-Goog-Signature=***",
        ),
        (
            "https://h/x?AWSAccessKeyId=AKIA&Signature=abc&Expires=1",
            "https://h/x?AWSAccessKeyId=***&Signature=***&Expires=1",
        ),
        ("https://h/x?api_key=1&password=2&auth=3&session=4&sessionToken=5", None),
    ],
)
def test_redact_uri(uri, expected):
    redacted = redact_uri(uri)
    if expected is None:
        assert redacted == "https://h/x?api_key=***&password=***&auth=***&session=***&sessionToken=***"
    else:
        assert redacted == expected


def test_redact_uri_hides_every_presigned_parameter():
    redacted = redact_uri(PRESIGNED)
    for value in (SIG, "AKIAIOSFODNN7EXAMPLE", "FwoGZXIvYXdzEXAMPLETOKEN"):
        assert value not in redacted
    for kept in ("X-Amz-Algorithm=AWS4-HMAC-SHA256", "X-Amz-Expires=3600", "X-Amz-SignedHeaders=host", "cat.png"):
        assert kept in redacted
    assert "X-Amz-Signature=***" in redacted and "X-Amz-Credential=***" in redacted
    assert "X-Amz-Security-Token=***" in redacted
    assert redact_uri(None) is None and redact_uri(3) == 3


def test_secret_names():
    secret = ["key", "secret", "token", "aws_secret_access_key", "aws_session_token", "aws_access_key_id", "password",
              "passwd", "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "X-Goog-Signature", "sig",
              "account_key", "sas_token", "SSECustomerKey", "apikey", "credentials", "Authorization",
              "connection_string"]  # fmt: skip
    plain = ["endpoint_url", "region_name", "signature_version", "X-Amz-SignedHeaders", "X-Amz-Date", "anon",
             "use_ssl", "max_attempts", "retries", "versionId", "sv", "se", "generation", "profile"]  # fmt: skip
    assert [n for n in secret if not is_secret_name(n)] == []
    assert [n for n in plain if is_secret_name(n)] == []


def test_redact_options_at_any_depth():
    options = {
        "key": "AKIAEXAMPLE",
        "secret": SECRET,
        "token": None,
        "anon": False,
        "client_kwargs": {"endpoint_url": f"http://minio:{SECRET}@minio:9000", "aws_session_token": "FwoGZXIv"},
        "config_kwargs": {"signature_version": "s3v4", "retries": {"max_attempts": 5}},
        "s3_additional_kwargs": {"SSECustomerKey": "c2VjcmV0a2V5"},
        "password": "hunter22",
    }
    redacted = redact_options(options)
    assert redacted == {
        "key": REDACTED,
        "secret": REDACTED,
        "token": None,
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://***@minio:9000", "aws_session_token": REDACTED},
        "config_kwargs": {"signature_version": "s3v4", "retries": {"max_attempts": 5}},
        "s3_additional_kwargs": {"SSECustomerKey": REDACTED},
        "password": REDACTED,
    }
    assert options["secret"] == SECRET  # a copy
    assert redact_options(None) == {}


def test_redact_text_removes_secrets_quoted_without_their_scheme():
    uri = f"s3://AKIAEXAMPLE:{SECRET}@bucket/images/a.png"
    botocore = f'Parameter validation failed: Invalid bucket name "AKIAEXAMPLE:{SECRET}@bucket": Bucket name must ...'
    text = redact_text(botocore, uris=[uri])
    assert SECRET not in text and "AKIAEXAMPLE" not in text and "Invalid bucket name" in text
    # the password alone, percent-decoded, or a storage-option value quoted anywhere
    assert SECRET not in redact_text(f"auth failed for {SECRET}", uris=[uri])
    encoded = "s3://u:a%2Fb%2Bc%40dddd@bucket/x"
    assert "a/b+c@dddd" not in redact_text("bad password a/b+c@dddd", uris=[encoded])
    options = [{"client_kwargs": {"aws_session_token": "FwoGZXIvYXdz"}}, {"secret": SECRET}]
    assert redact_text(f"token FwoGZXIvYXdz rejected; secret {SECRET}", storage_options=options) == (
        "token *** rejected; secret ***"
    )
    assert secret_values({"token": "abc"}) == set()  # too short to be a credential; replacing it would mangle text


def test_redact_text_without_being_told_the_secrets():
    assert (
        redact_text(f"cannot open s3://AKIA:{SECRET}@bucket/x.png: denied")
        == "cannot open s3://***@bucket/x.png: denied"
    )
    assert SIG not in redact_text(f"GET {PRESIGNED} -> 403")
    header = f"Authorization: AWS4-HMAC-SHA256 Credential=AKIA/20240101/us-east-1/s3/aws4_request, Signature={SIG}"
    assert redact_text(header) == "Authorization: AWS4-HMAC-SHA256 Credential=***, Signature=***"
    assert (
        redact_text("{'secret': 'abcdef', 'endpoint_url': 'http://h'}")
        == "{'secret': '***', 'endpoint_url': 'http://h'}"
    )
    assert redact_text('"X-Amz-Signature": "deadbeef"') == '"X-Amz-Signature": "***"'
    plain = "image 12 of s3://bucket/me@example.com/k.jpg: 3x4 pixels, max_attempts=5"
    assert redact_text(plain) == plain


def test_redact_text_removes_scheme_less_userinfo_it_was_not_told_about():
    """botocore quotes an s3 URI's userinfo as part of the bucket name, without the scheme."""
    botocore = 'Parameter validation failed: Invalid bucket name "AKIAFAKE:SECRETXYZ1@bucket": Bucket name must'
    assert redact_text(botocore) == 'Parameter validation failed: Invalid bucket name "***@bucket": Bucket name must'
    assert redact_text(f"bucket AK:{SECRET}@bucket/x.png") == "bucket ***@bucket/x.png"  # '/', '+', '@' in it
    assert redact_text(f"s3://AK:{SECRET}@b/k and AK:{SECRET}@b") == "s3://***@b/k and ***@b"
    for plain in ("mail me@example.com at 04:17:24", "C:\\data\\x.png", "s3://bucket/k:1@2", "a.py:12 in f"):
        assert redact_text(plain) == plain


@pytest.mark.parametrize("scheme", ["s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "S3"])
def test_object_store_uris_refuse_userinfo(scheme):
    problem = userinfo_error(f"{scheme}://AKIAFAKE:{SECRET}@bucket/x/{{0..2}}.tar")
    assert problem is not None and "AKIAFAKE" not in problem and SECRET not in problem
    assert "***@bucket" in problem and "storage_options" in problem and "environment" in problem
    assert userinfo_error(f"{scheme}://bucket/me@example.com/k.jpg") is None  # an "@" in a key is no userinfo
    assert userinfo_error(f"{scheme}://bucket/k.jpg") is None


def test_http_basic_auth_and_local_paths_are_not_refused():
    assert userinfo_error(f"https://user:{SECRET}@host/w.safetensors") is None
    assert userinfo_error("http://user:pw@host/w.safetensors") is None
    assert userinfo_error("/data/a:b@c/x.parquet") is None
    assert userinfo_error(None) is None


def test_redact_error_keeps_the_type_and_drops_secret_causes():
    uri = f"s3://AKIA:{SECRET}@bucket/w.safetensors"
    plain = FileNotFoundError("bucket/w.safetensors")
    assert redact_error(plain, uris=[uri]) is plain  # nothing to hide: raised as it is, with its causes
    try:
        try:
            raise KeyError(f"bucket AKIA:{SECRET}@bucket")
        except KeyError as inner:
            raise ValueError("Invalid bucket name") from inner
    except ValueError as e:
        clean = redact_error(e, uris=[uri])  # the message is clean, its cause is not
    assert type(clean) is ValueError and str(clean) == "Invalid bucket name" and clean.__cause__ is None

    class ClientError(Exception):  # botocore's needs (error_response, operation_name)
        def __init__(self, response, operation):
            super().__init__(f"{operation}: {response}")

    clean = redact_error(ClientError(f"token={SECRET}", "GetObject"), storage_options={"secret": SECRET})
    assert type(clean) is OSError and str(clean) == "ClientError: GetObject: token=***"


# ------------------------------------------------------------------------------------------------ filesystems, writes
def test_with_io_defaults_never_overrides_the_user():
    merged = with_io_defaults({"config_kwargs": {"read_timeout": 7}}, attempts=4, timeout_s=30)
    assert merged["config_kwargs"] == {
        "read_timeout": 7,
        "retries": {"max_attempts": 4, "mode": "standard"},
        "connect_timeout": 30.0,
    }
    assert with_io_defaults(None, attempts=2, timeout_s=None) == {
        "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}
    }


def test_atomic_writes_local_and_memory(tmp_path):
    fs, path = filesystem(str(tmp_path / "d" / "t.parquet"))
    assert not atomic_put(fs)
    write_table(pa.table({"a": [1, 2]}), fs, path)
    assert pq.read_table(path)["a"].to_pylist() == [1, 2]
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["t.parquet"]  # no temporary file left
    write_bytes(b"again", fs, str(tmp_path / "d" / "b.bin"))
    assert (tmp_path / "d" / "b.bin").read_bytes() == b"again"
    mem = fsspec.filesystem("memory")
    write_bytes(b"x", mem, "/clipmaps-storage-test/b.bin")
    assert mem.cat_file("/clipmaps-storage-test/b.bin") == b"x"
    s3, path = filesystem("s3://bucket/k", {"anon": True})
    assert atomic_put(s3) and path == "bucket/k"


def test_log_records_pass_the_redaction_rule(caplog):
    """A library that logs a presigned URL (fsspec's HTTP filesystem at DEBUG does) cannot leak it through the CLI's
    handlers."""
    import logging

    from clipmaps.schemas.storage import RedactingFilter

    log = logging.getLogger("fsspec.http.test")
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.DEBUG, logger="fsspec.http.test"):
        log.debug("GET %s", PRESIGNED)
        log.debug("plain %s", "https://example.com/a.png")
    assert SIG not in caplog.text and "X-Amz-Signature=***" in caplog.text
    assert "plain https://example.com/a.png" in caplog.text


PATTERN_NAMES = ["run[1]", "a*b", "what?", "x{a,b}"]


@pytest.mark.parametrize("name", PATTERN_NAMES)
def test_paths_with_glob_characters_are_literal(tmp_path, name):
    """A folder named like a glob pattern is read, written and deleted as itself, never as the pattern: a sibling
    the pattern matches (``run1`` for ``run[1]``, ``aXb`` for ``a*b``…) is left alone."""
    fs, root = filesystem(str(tmp_path))
    literal = join_uri(root, name)
    sibling = join_uri(root, {"run[1]": "run1", "a*b": "aXb", "what?": "whatX", "x{a,b}": "xa"}[name])
    for folder in (literal, sibling):
        write_bytes(folder.encode(), fs, join_uri(folder, "f[0].bin"))
        write_table(pa.table({"a": [1]}), fs, join_uri(folder, "sub", "part-0.parquet"))
    assert has_glob_characters(literal) and not has_glob_characters(sibling)
    assert read_bytes(fs, join_uri(literal, "f[0].bin")) == literal.encode()
    assert exists(fs, join_uri(literal, "sub", "part-0.parquet"))
    assert remove(fs, join_uri(literal, "f[0].bin")) == 1
    assert not exists(fs, join_uri(literal, "f[0].bin")) and exists(fs, join_uri(sibling, "f[0].bin"))
    assert remove(fs, literal, recursive=True) == 1
    assert not (tmp_path / name).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [sibling.rsplit("/", 1)[-1]]
    assert read_bytes(fs, join_uri(sibling, "f[0].bin")) == sibling.encode()
    assert remove(fs, literal, recursive=True) == 0  # gone: nothing to do, no error


def test_remove_refuses_a_folder_without_recursive(tmp_path):
    fs, root = filesystem(str(tmp_path))
    write_bytes(b"x", fs, join_uri(root, "d[1]", "f"))
    with pytest.raises(IsADirectoryError):
        remove(fs, join_uri(root, "d[1]"))
    assert (tmp_path / "d[1]" / "f").exists()


def test_remove_on_an_object_store_with_pattern_keys():
    """The memory filesystem stands for an object store (no directories, bulk rm): pattern keys are still exact."""
    fs = fsspec.filesystem("memory")
    for key in ("/lit/k[1]/a", "/lit/k[1]/b", "/lit/k1/a"):
        fs.pipe_file(key, b"x")
    assert remove(fs, "/lit/k[1]", recursive=True) == 2
    assert fs.find("/lit") == ["/lit/k1/a"]


def test_an_empty_table_is_a_schema_without_row_groups(tmp_path):
    """0 rows: the schema is there and no row group (a 0-row row group makes Hugging Face datasets fail)."""
    fs, root = filesystem(str(tmp_path))
    schema = pa.schema([pa.field("a", pa.int32(), nullable=False), pa.field("b", pa.list_(pa.float32(), 4))])
    write_table(schema.empty_table(), fs, join_uri(root, "e.parquet"))
    meta = pq.read_metadata(tmp_path / "e.parquet")
    assert meta.num_row_groups == 0 and meta.num_rows == 0
    assert pq.read_schema(tmp_path / "e.parquet").equals(schema)


def test_is_inside_keeps_pattern_characters_of_object_keys():
    """``?`` is a query only in an http(s) URL: in an object key it is a character of the path."""
    assert not is_inside("s3://b/lit[1]*?{a,b}/out", "s3://b/lit[1]*?{a,b}/manifest.jsonl")
    assert is_inside("s3://b/lit[1]*?{a,b}/out/labels", "s3://b/lit[1]*?{a,b}/out")
    assert is_inside("https://h/a/b?X-Amz-Signature=1", "https://h/a?x=2")
    assert not is_inside("/tmp/x?/out", "/tmp/x?/in")
