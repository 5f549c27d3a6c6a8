// SPDX-License-Identifier: MIT
// Must not compile: a softmax over integers would truncate every weight to 0 or 1.
#include <Eigen/Core>

#include <mha/normalization.hpp>

int main() {
    Eigen::MatrixXi scores = Eigen::MatrixXi::Ones(3, 2);
    mha::softmax_columns(scores);
}
