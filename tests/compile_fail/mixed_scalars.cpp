// SPDX-License-Identifier: MIT
// Must not compile: float queries against double keys and values.
#include <Eigen/Core>

#include <mha/attention.hpp>

int main() {
    const Eigen::MatrixXf q = Eigen::MatrixXf::Ones(4, 3);
    const Eigen::MatrixXd k = Eigen::MatrixXd::Ones(4, 5), v = Eigen::MatrixXd::Ones(2, 5);
    Eigen::MatrixXf out(2, 3);
    mha::scaled_dot_product_attention(q, k, v, out);
}
