# Tests registered by hand: the GPU test (its own name and label), the
# independent float64 reference (Python + numpy) and the command-line
# contract.  Included by CMakeLists.txt after the cmocka tests.

# The cuda backend against ref at GPU sizes (`ctest -L gpu`); 77 without a
# CUDA device or without CUDA compiled in, reported as skipped.
add_executable(test_gpu tests/kernels/test_gpu.c)
target_link_libraries(test_gpu PRIVATE kvs PkgConfig::CMOCKA)
add_test(NAME gpu_kernels COMMAND test_gpu)
set_tests_properties(gpu_kernels PROPERTIES LABELS "gpu" SKIP_RETURN_CODE 77 TIMEOUT 900)
# The same harness with the cpu backend standing in for cuda: what the test
# builds and asks is checked on every machine, the cuda kernels only above.
add_test(NAME gpu_kernels_harness COMMAND test_gpu)
set_tests_properties(gpu_kernels_harness PROPERTIES LABELS "cpu;slow" TIMEOUT 900
                     ENVIRONMENT "KVS_TEST_GPU_BACKEND=cpu")
# These two run the cuda backend too wherever one is present.
set_tests_properties(test_kern_ops test_attn_policy test_kv_quant PROPERTIES LABELS "cpu;gpu")

find_program(KVS_PYTHON3 NAMES python3 PATHS /usr/bin NO_DEFAULT_PATH)
if(KVS_PYTHON3)
  add_test(NAME reference_logits
           COMMAND ${KVS_PYTHON3} ${CMAKE_CURRENT_SOURCE_DIR}/tests/reference/check_logits.py
                   --kvserve $<TARGET_FILE:kvserve> --dtypes f32,f16,bf16,q8_0 --steps 32
                   --threads 2 --workdir ${CMAKE_CURRENT_BINARY_DIR}/reference)
  # 77: numpy missing, reported as skipped rather than passed.
  set_tests_properties(reference_logits PROPERTIES LABELS "cpu;reference" SKIP_RETURN_CODE 77
                       TIMEOUT 900)
endif()
add_test(NAME cli COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/tests/integration/cli.sh
                          $<TARGET_FILE:kvserve> ${CMAKE_CURRENT_BINARY_DIR}/cli)
set_tests_properties(cli PROPERTIES LABELS "cpu" TIMEOUT 300)

if(KVS_PYTHON3)
  # The bundled model: eval's JSON in CI-sized form, and the engine against
  # the training script's PyTorch forward (skipped where torch is missing).
  add_test(NAME eval_bundled
           COMMAND ${KVS_PYTHON3} ${CMAKE_CURRENT_SOURCE_DIR}/tests/integration/check_eval.py
                   $<TARGET_FILE:kvserve> ${CMAKE_CURRENT_BINARY_DIR}/eval)
  set_tests_properties(eval_bundled PROPERTIES LABELS "cpu;reference" SKIP_RETURN_CODE 77
                       TIMEOUT 600)
  add_test(NAME torch_logits
           COMMAND ${KVS_PYTHON3} ${CMAKE_CURRENT_SOURCE_DIR}/tests/reference/check_torch.py
                   --kvserve $<TARGET_FILE:kvserve>)
  set_tests_properties(torch_logits PROPERTIES LABELS "cpu;reference" SKIP_RETURN_CODE 77
                       TIMEOUT 600)
endif()

# The gRPC API end to end: the real `kvserve serve` on a loopback port, driven
# by Python grpcio, the C client and Node @grpc/grpc-js (tests/node).  Debian's
# /usr/bin/python3 on purpose (python3-grpcio); 77 when grpcio or protoc is
# missing, reported as skipped.
add_test(NAME grpc_integration
         COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/tests/integration/test_grpc.py
                 $<TARGET_FILE:kvserve> ${CMAKE_CURRENT_BINARY_DIR}/grpc-it)
set_tests_properties(grpc_integration PROPERTIES LABELS "cpu;integration" SKIP_RETURN_CODE 77
                     TIMEOUT 300)

# The deployment assets (deploy/): yamllint, kustomize renders checked against
# the Kubernetes schema and our probe/drain/GPU rules, Dockerfile linters,
# promtool on the Prometheus config, shellcheck.  Tools from scripts/setup.sh.
add_test(NAME deploy_lint COMMAND sh ${CMAKE_CURRENT_SOURCE_DIR}/deploy/lint.sh)
set_tests_properties(deploy_lint PROPERTIES LABELS "lint" TIMEOUT 300)

# The cuda backend's decoders run on the host: it needs nvcc, not a GPU.
# cuda_dequant: the weight blocks (cuda_dequant.cuh) against kern_row_to_f32;
# cuda_kvq: the quantized KV tiles (cuda_kvq.cuh) against kern_kvq_decode;
# cuda_wg_layout: the wgmma prefill kernel's shared-memory layout
# (cuda_attn_tc.cuh) against PTX's descriptor layouts;
# cuda_tc_walk: that kernel's walk over the keys a row sees (which tiles,
# which keys in them) against kern.h's rule.
if(KVS_HAVE_CUDA)
  foreach(t cuda_dequant cuda_kvq cuda_wg_layout cuda_tc_walk)
    add_executable(test_${t} tests/kernels/test_${t}.cu)
    target_link_libraries(test_${t} PRIVATE kvs PkgConfig::CMOCKA)
    target_compile_options(test_${t} PRIVATE
      -Xcompiler=-Wall,-Wno-unused-parameter --Werror=all-warnings)
    add_test(NAME ${t} COMMAND test_${t})
    set_tests_properties(${t} PROPERTIES LABELS "cpu;gpu")
  endforeach()
endif()
