#!/usr/bin/env bash
# Build the deployment package of the aggregate-job-logs Lambda function (handler
# jobs.triggers.aws_lambda.handler, runtime python3.11, x86_64): hostmeter and its dependencies
# as Linux wheels, zipped. boto3 is not included: the Lambda Python runtime provides it (and its
# botocore needs python-dateutil < 3, so the package keeps to that).
#
#   bash infra/aws/lambda-package.sh [OUT.zip]      (default: dist/hostmeter-lambda.zip)
#   aws s3 cp dist/hostmeter-lambda.zip s3://BUCKET/hostmeter/hostmeter-lambda-0.1.0.zip
#
# Then deploy the stack with LambdaCodeS3Bucket=BUCKET and that key. Use a new key for each
# release: CloudFormation updates the function only when the key (or bucket) changes.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$root/dist/hostmeter-lambda.zip}"
mkdir -p "$(dirname "$out")"
out="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
python="${PYTHON:-python3}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/wheel" "$root"
"$python" -m pip install --quiet --target "$work/package" --only-binary=:all: \
  --platform manylinux2014_x86_64 --implementation cp --python-version 3.11 \
  "$work"/wheel/hostmeter-*.whl "python-dateutil>=2.8.2,<3"

"$python" - "$work/package" "$out" <<'EOF'
import os
import sys
import zipfile

src, out = sys.argv[1], sys.argv[2]
files = unpacked = 0
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
    for folder, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            path = os.path.join(folder, name)
            zf.write(path, os.path.relpath(path, src))
            files += 1
            unpacked += os.path.getsize(path)
mib = 1024 * 1024
print(f"{out}: {files} files, {os.path.getsize(out) / mib:.1f} MiB zipped, "
      f"{unpacked / mib:.1f} MiB unzipped (Lambda allows 250 MiB unzipped)")
if unpacked > 250 * mib:
    sys.exit("the package is over Lambda's 250 MiB unzipped limit")
EOF
