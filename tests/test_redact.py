import pytest

from sleepctl.redact import redact


@pytest.mark.parametrize(
    "text, secret, kind",
    [
        ("key sk-proj-abcdefghijklmnopqrstuvwxyz0123", "sk-proj-abcdefghij", "openai_key"),
        ("aws AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE", "aws_access_key"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_abcdefghij", "github_token"),
        ("slack xoxb-1234567890-abcdefghij", "xoxb-1234567890", "slack_token"),
        ("Authorization: Bearer abc.def-ghi_jkl123456", "abc.def-ghi_jkl123456", "bearer_token"),
        ("db postgres://admin:s3cr3tpw@db.internal:5432/app", "s3cr3tpw", "url_password"),
        ("password = 'Tr0ub4dor&3'", "Tr0ub4dor&3", "secret_assignment"),
        ("API_KEY: 9f8e7d6c5b4a39281706", "9f8e7d6c5b4a39281706", "secret_assignment"),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
            "MIIEowIBAAKCAQEA",
            "private_key",
        ),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.abcdefghijklmnop", "eyJhbGciOiJIUzI1NiJ9", "jwt"),
    ],
)
def test_redacts(text, secret, kind):
    out, n = redact(text)
    assert secret not in out and f"[REDACTED:{kind}]" in out and n >= 1


def test_leaves_ordinary_text_alone():
    text = (
        "Orla moved the Kestrel server to Tallinn; see https://wiki.example.com/kestrel. The password policy changed."
    )
    assert redact(text) == (text, 0)


def test_url_keeps_shape():
    out, _ = redact("clone https://bob:pw123456@git.example.com/repo.git")
    assert out == "clone https://bob:[REDACTED:url_password]@git.example.com/repo.git"
