#!/bin/sh
# An AWS_LAMBDA_EXEC_WRAPPER script: gets the runtime's command line as its arguments.
echo "wrapper got: $*"
export WRAPPED_BY=wrapper.sh
exec "$@"
