// SPDX-License-Identifier: MIT
// Must not compile: scores of integer keys and queries would be truncated before the softmax.
#include <Eigen/Core>

#include <mha/attention.hpp>

int main() {
    const Eigen::MatrixXi k = Eigen::MatrixXi::Ones(4, 5), q = Eigen::MatrixXi::Ones(4, 3);
    Eigen::MatrixXi scores(5, 3);
    mha::attention_scores(k, q, 1, scores);
}
